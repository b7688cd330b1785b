"""`export-hf` and `import-hf`: checkpoints <-> folders transformers' BambaForCausalLM loads.

Every transformers name and shape comes from fms_bamba.model.hf_mapping; this module only moves
tensors between files, a shard at a time on export.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from checkpoints_tools.common import (
    cast,
    check_output,
    check_shapes,
    model_shapes,
    open_model_checkpoint,
    output_dtype,
    replacing,
    write_model_checkpoint,
)
from fms_bamba.checkpoint import iter_tensors
from fms_bamba.generate import copy_tokenizer, find_tokenizer
from fms_bamba.model import BambaConfig
from fms_bamba.model import hf_mapping

INDEX_FILE = "model.safetensors.index.json"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from 5000000, "5GB" (powers of 10) or "4GiB" (powers of 2)."""
    match = _SIZE.match(str(size))
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"--max-shard-size must be a positive size such as 5GB or 500MiB, got {size!r}")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])


def hf_layout(config: BambaConfig) -> dict[str, tuple[str, torch.Size]]:
    """Framework name -> (transformers name, transformers shape), in the model's order; the
    mapping runs on meta tensors, so the layout costs no memory."""
    shapes = model_shapes(config)
    hf_state = hf_mapping.to_hf_state_dict({k: torch.empty(s, device="meta") for k, s in shapes.items()}, config)
    names = hf_mapping.hf_names(config)
    return {ours: (names[ours], hf_state[names[ours]].shape) for ours in shapes}


def plan_shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Consecutive groups of names whose bytes stay under max_bytes (a larger tensor goes alone)."""
    shards: list[list[str]] = [[]]
    filled = 0
    for name, nbytes in sizes.items():
        if shards[-1] and filled + nbytes > max_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += nbytes
    return shards


def export_hf(
    ckpt: str | os.PathLike,
    out: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
) -> Path:
    """Write config.json, model-0000i-of-0000N.safetensors with their index, and the tokenizer
    files (`tokenizer`, else the run's tokenizer/ when the checkpoint is inside a run). Reads one
    shard's tensors at a time. dtype=None keeps the stored dtype."""
    out = Path(out)
    max_bytes = parse_size(max_shard_size)
    check_output(out, overwrite)
    if tokenizer is not None and not Path(tokenizer).exists():
        raise FileNotFoundError(f"--tokenizer: {tokenizer} does not exist")
    ckpt_dir, _, config, stored = open_model_checkpoint(ckpt)
    layout = hf_layout(config)
    sizes = {name: shape.numel() * output_dtype(stored[name][1], dtype).itemsize
             for name, (_, shape) in layout.items()}
    shards = plan_shards(sizes, max_bytes)
    tokenizer_source = Path(tokenizer) if tokenizer is not None else find_tokenizer(ckpt_dir)

    with replacing(out, overwrite) as scratch:
        scratch.mkdir()
        weight_map = {}
        for number, names in enumerate(shards, start=1):
            file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for key, tensor in iter_tensors(ckpt_dir, keys=[f"model.{name}" for name in names]):
                hf_name, hf_shape = layout[key.removeprefix("model.")]
                tensors[hf_name] = cast(tensor, dtype).reshape(hf_shape).contiguous()
                weight_map[hf_name] = file
            save_file(tensors, scratch / file, metadata={"format": "pt"})
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (scratch / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        (scratch / "config.json").write_text(json.dumps(hf_mapping.config_to_hf(config), indent=2) + "\n")
        if tokenizer_source is not None:
            copy_tokenizer(tokenizer_source, scratch)
    return out


def import_hf(
    hf_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: torch.dtype | None = torch.float32,
    overwrite: bool = False,
) -> Path:
    """Write a transformers Bamba folder as a committed checkpoint for continued training
    (`checkpoint.init_from=OUT`, `init_load=model`). dtype defaults to float32, the dtype of the
    trainer's master weights; None keeps the stored dtype."""
    hf_dir, out = Path(hf_dir), Path(out)
    check_output(out, overwrite)
    config = hf_mapping.read_hf_config(hf_dir)
    hf_state = hf_mapping.load_safetensors_folder(hf_dir)  # memory-mapped: pages load as tensors are used
    check_shapes({name: tensor.shape for name, tensor in hf_state.items()},
                 {hf_name: shape for hf_name, shape in hf_layout(config).values()}, str(hf_dir))
    state = {name: cast(tensor, dtype) for name, tensor in hf_mapping.from_hf_state_dict(hf_state, config).items()}
    del hf_state
    return write_model_checkpoint(out, state, config, {"format": "transformers", "path": str(hf_dir)})
