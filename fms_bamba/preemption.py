"""Preemption: a signal on any rank becomes a stop that every rank agrees on at a step boundary.

Slurm sends SIGTERM (or the signal chosen with `--signal`, typically SIGUSR1) some time before it
kills a job; Ctrl-C sends SIGINT. The handler only sets a flag; the train loop asks
`stop_requested()` after each step, which all-reduces the flag over a gloo group (no GPU sync),
so all ranks save the same step and exit with `EXIT_PREEMPTED`.
"""

from __future__ import annotations

import logging
import os
import signal
from types import FrameType

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

EXIT_PREEMPTED = 85
"""Exit code of a run that saved a checkpoint because it was told to stop; relaunching the same
command resumes it (the Slurm launcher requeues on it). Chosen outside the shell's 128+signal range."""


class PreemptionHandler:
    """Installs SIGTERM/SIGUSR1 handlers (and SIGINT on a single process) that request a stop."""

    def __init__(self) -> None:
        self.distributed = dist.is_available() and dist.is_initialized()
        world_size = dist.get_world_size() if self.distributed else int(os.environ.get("WORLD_SIZE", "1"))
        self.signals = [signal.SIGTERM, signal.SIGUSR1]
        # Under torchrun a Ctrl-C reaches the launcher, which stops the workers with SIGTERM itself.
        if world_size == 1:
            self.signals.append(signal.SIGINT)
        self.group = dist.new_group(backend="gloo") if self.distributed else None
        self.received: int | None = None
        self.previous = {sig: signal.signal(sig, self._on_signal) for sig in self.signals}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without saving
        self.received = signum
        logger.warning("received %s: saving a checkpoint and stopping at the end of this step",
                       signal.Signals(signum).name)

    def stop_requested(self) -> bool:
        """True on every rank if any rank received a signal; collective, call it at each step boundary."""
        if not self.distributed:
            return self.received is not None
        flag = torch.tensor([int(self.received is not None)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

    def close(self) -> None:
        """Restore the signal handlers that were installed before."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}
