"""Offline tools over Bamba checkpoints: consolidate, export to / import from transformers, import
the original trainer's (mamba-ssm) checkpoints, inspect. The command line is `bamba-ckpt`."""

from checkpoints_tools.consolidate import consolidate
from checkpoints_tools.hf import export_hf, import_hf
from checkpoints_tools.inspect_checkpoint import describe
from checkpoints_tools.original import import_original

__all__ = ["consolidate", "describe", "export_hf", "import_hf", "import_original"]
