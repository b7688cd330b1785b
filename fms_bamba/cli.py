"""`fms-bamba COMMAND ...`: train | generate | prepare | plot.

Under torchrun: `torchrun --nproc_per_node=N -m fms_bamba.cli train CONFIG --section.field=value`."""

from __future__ import annotations

import sys
from typing import Callable

import fire

USAGE = """usage: fms-bamba COMMAND [ARGS ...]

commands:
{commands}

`fms-bamba train` with no arguments trains the tiny model on the built-in Python-stdlib corpus."""

TRAIN_HELP = """usage: fms-bamba train [CONFIG] [--section.field=value ...]

Trains, or resumes the run in job.run_dir from its latest complete checkpoint. CONFIG is a YAML
file of the sections below; any field can also be set on the command line (the value is read as
YAML: --training.steps=10, --data.datasets=[a,b], --model.vocab_size=null). The values shown are
the built-in defaults, or CONFIG's where it is given. Under torchrun:
`torchrun --nproc_per_node=N -m fms_bamba.cli train CONFIG ...`.
"""


def train_command(argv: list[str]) -> int:
    """train [CONFIG] [--section.field=value ...]: train, or resume the run in job.run_dir."""
    from fms_bamba.config import ConfigError, describe_job_config, load_job_config
    from fms_bamba.train import TrainingDiverged, train

    def run(config: str | None = None, **overrides) -> None:
        train(load_job_config(config, overrides))

    try:
        if "--help" in argv or "-h" in argv:
            config = next((arg for arg in argv if not arg.startswith("-")), None)
            print(TRAIN_HELP + describe_job_config(load_job_config(config)))
            return 0
        fire.Fire(run, command=argv, name="fms-bamba train")
    except ConfigError as err:
        print(f"fms-bamba train: error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"fms-bamba train: error: {err}", file=sys.stderr)
        return 1
    return 0


def generate_command(argv: list[str]) -> int:
    """generate SOURCE --prompt TEXT: continue text from a run, a checkpoint or a transformers folder."""
    from fms_bamba.generate import main as generate_main

    return generate_main(argv)


def prepare_command(argv: list[str]) -> int:
    """prepare ...: tokenize raw text corpora into loader shards (see `fms-bamba prepare --help`)."""
    from data_loader.prepare import main as prepare_main

    return prepare_main(argv) or 0


def plot_command(argv: list[str]) -> int:
    """plot RUN_DIR [--out PNG]: draw loss and tokens/s/GPU of a run (default RUN_DIR/metrics.png)."""
    from fms_bamba.plot import plot_run

    def run(run_dir: str, out: str | None = None) -> None:
        print(plot_run(run_dir, out))

    try:
        fire.Fire(run, command=argv, name="fms-bamba plot")
    except (FileNotFoundError, ValueError) as err:
        print(f"fms-bamba plot: error: {err}", file=sys.stderr)
        return 2
    return 0


# Each command takes the arguments after its name and returns an exit code.
COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "train": train_command,
    "generate": generate_command,
    "prepare": prepare_command,
    "plot": plot_command,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    listing = "\n".join(f"  {command.__doc__.splitlines()[0]}" for command in COMMANDS.values())
    asked_for_help = not argv or argv[0] in ("-h", "--help", "help")
    print(USAGE.format(commands=listing), file=sys.stdout if asked_for_help else sys.stderr)
    if asked_for_help:
        return 0
    print(f"fms-bamba: error: unknown command {argv[0]!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
