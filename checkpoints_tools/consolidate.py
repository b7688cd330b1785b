"""`consolidate`: a sharded DCP checkpoint -> one safetensors or torch file, read a tensor at a time."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from checkpoints_tools.common import cast, check_output, check_shapes, model_config_of, model_shapes, replacing
from fms_bamba.checkpoint import iter_tensors, list_tensors, read_meta, resolve_checkpoint

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
    ckpt_dir = resolve_checkpoint(ckpt)
    meta = read_meta(ckpt_dir)
    config = model_config_of(meta, ckpt_dir)
    expected = model_shapes(config)
    stored = list_tensors(ckpt_dir, "model.")
    check_shapes({key.removeprefix("model."): shape for key, (shape, _) in stored.items()}, expected, str(ckpt_dir))
    keys = [f"model.{name}" for name in expected]
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
