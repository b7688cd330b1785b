"""torchrun, except that its exit status tells a preempted run from a failed one.

torchrun exits with status 1 whenever a worker exits non-zero, so a Slurm job could not tell
workers that saved a checkpoint and stopped for preemption (status EXIT_PREEMPTED: requeue the
job) from a crash (do not). This runs torchrun's own agent with torchrun's arguments and exits
with EXIT_PREEMPTED when workers stopped for preemption and none failed.

The agent ignores SIGUSR1. Slurm delivers a job step's signals to every process of the step,
workers included; torchrun does not handle SIGUSR1, would die of it, and its workers would be
killed with the step before they had saved. The workers inherit the ignore until
fms_bamba.preemption installs its handler.
"""

import signal
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.elastic.rendezvous import RendezvousError
from torch.distributed.run import get_args_parser, run

from fms_bamba.preemption import EXIT_PREEMPTED


def main(argv: list[str]) -> int:
    """Run torchrun with `argv`; return 0, EXIT_PREEMPTED, or 1 for any other failure."""
    args = get_args_parser().parse_args(argv)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        run(args)
    except ChildFailedError as failed:
        print(failed, file=sys.stderr)
        exit_codes = [failure.exitcode for failure in failed.failures.values()]
        # Once one worker has exited, the agent stops the others with SIGTERM: a negative status
        # (death by a signal) is its doing; any other status is a failure of the worker's own.
        preempted = EXIT_PREEMPTED in exit_codes and all(
            code == EXIT_PREEMPTED or code < 0 for code in exit_codes)
        return EXIT_PREEMPTED if preempted else 1
    except RendezvousError as err:
        reason = " ".join(str(part) for part in (err, err.__cause__) if part)
        print(f"torchrun: error: the rendezvous at {args.rdzv_endpoint} failed: "
              f"{type(err).__name__} {reason}\n"
              f"torchrun: are all {args.nnodes} nodes up, and can they reach that port?", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
