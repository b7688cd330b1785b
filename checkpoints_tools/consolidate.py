"""`consolidate`: a sharded DCP checkpoint -> one safetensors or torch file, read a tensor at a time."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from checkpoints_tools.common import cast, check_output, open_model_checkpoint, replacing
from fms_bamba.checkpoint import iter_tensors, list_tensors

FORMATS = {".safetensors": "safetensors", ".pt": "torch", ".pth": "torch", ".bin": "torch"}


def output_format(out: Path) -> str:
    try:
        return FORMATS[out.suffix]
    except KeyError:
        raise ValueError(f"{out}: name the output file *.safetensors, or *.pt / *.pth / *.bin for a torch file") from None


def consolidate(
    ckpt: str | os.PathLike,
    out: str | os.PathLike,
    *,
    optimizer: bool = False,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the model (Bamba.state_dict() names) of a checkpoint, or of a run's latest complete
    one, to a single file. With `optimizer`, keys keep the checkpoint's "model." / "optimizer."
    prefixes and the optimizer's tensors come too. Peak memory is the output plus one tensor."""
    out = Path(out)
    file_format = output_format(out)
    check_output(out, overwrite)
    ckpt_dir, meta, config, stored = open_model_checkpoint(ckpt)
    keys = [f"model.{name}" for name in stored]
    if optimizer:
        optimizer_keys = list(list_tensors(ckpt_dir, "optimizer."))
        if not optimizer_keys:
            raise ValueError(f"{ckpt_dir}: holds no optimizer state (written by an import?); drop --optimizer")
        keys += optimizer_keys

    tensors = {}
    for key, tensor in iter_tensors(ckpt_dir, keys=keys):
        tensors[key if optimizer else key.removeprefix("model.")] = cast(tensor, dtype)
    with replacing(out, overwrite) as scratch:
        if file_format == "safetensors":
            header = {"format": "pt", "step": str(meta["step"]), "tokens_seen": str(meta.get("tokens_seen")),
                      "model_config": json.dumps(dataclasses.asdict(config)), "source": str(ckpt_dir)}
            save_file(tensors, scratch, metadata=header)
        else:
            torch.save(tensors, scratch)
    return out
