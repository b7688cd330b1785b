"""What every command shares: dtype names, output paths, a checkpoint opened with its model config
and its tensors checked against it, and writing an imported model as a committed checkpoint."""

from __future__ import annotations

import dataclasses
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NamedTuple

import torch

from fms_bamba.checkpoint import list_tensors, read_meta, resolve_checkpoint, write_checkpoint
from fms_bamba.generate import DTYPES, model_config_of, runtime_neutral
from fms_bamba.model import Bamba, BambaConfig

PARTIAL_SUFFIX = ".partial"


def parse_dtype(name: str | None) -> torch.dtype | None:
    """A --dtype value (fp32 | bf16 | fp16, or torch's long names); None keeps the stored dtype."""
    if name is None:
        return None
    try:
        return DTYPES[str(name).lower()]
    except KeyError:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {name!r}") from None


def output_dtype(stored: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    """`dtype` for floating-point tensors; integer state (counters) and dtype=None keep `stored`."""
    return dtype if dtype is not None and stored.is_floating_point else stored


def cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(output_dtype(tensor.dtype, dtype))


def check_output(path: Path, overwrite: bool) -> None:
    """Refuse an existing output unless --overwrite; called before any expensive work."""
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def replacing(path: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a scratch sibling of `path` to write; only a complete write replaces `path`, so an
    interrupted command never leaves a half-written output under the final name."""
    check_output(path, overwrite)
    scratch = path.with_name(path.name + PARTIAL_SUFFIX)
    _remove(scratch)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield scratch
    except BaseException:
        _remove(scratch)
        raise
    _remove(path)
    os.replace(scratch, path)


def model_shapes(config: BambaConfig) -> dict[str, torch.Size]:
    """Shape of every tensor of `Bamba(config).state_dict()`, in its order, without allocating."""
    with torch.device("meta"):
        model = Bamba(config)
    return {name: tensor.shape for name, tensor in model.state_dict().items()}


def check_shapes(found: dict[str, torch.Size], expected: dict[str, torch.Size], source: str) -> None:
    """Raise ValueError naming the keys of `found` that are missing, unexpected or mis-shaped."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [f"{k} {tuple(found[k])} (expected {tuple(expected[k])})"
             for k in expected if k in found and found[k] != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {', '.join(unexpected[:5])}"
                        f"{' ...' if len(unexpected) > 5 else ''}")
    if wrong:
        problems.append(f"wrong shape: {'; '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''}")
    if problems:
        raise ValueError(f"{source}: tensors do not match the model config: {'; '.join(problems)}")


class ModelCheckpoint(NamedTuple):
    path: Path
    """The checkpoint directory."""
    meta: dict
    """Its meta.json."""
    config: BambaConfig
    """The model config meta.json records."""
    tensors: dict[str, tuple[torch.Size, torch.dtype]]
    """Framework name (no "model." prefix) -> stored shape and dtype, in the model's order."""


def open_model_checkpoint(ckpt: str | os.PathLike) -> ModelCheckpoint:
    """A checkpoint, or a run's latest complete one, whose model tensors match its model config
    (ValueError naming what does not); reads metadata only."""
    ckpt_dir = resolve_checkpoint(ckpt)
    meta = read_meta(ckpt_dir)
    config = model_config_of(meta, ckpt_dir)
    expected = model_shapes(config)
    stored = {key.removeprefix("model."): spec for key, spec in list_tensors(ckpt_dir, "model.").items()}
    check_shapes({name: shape for name, (shape, _) in stored.items()}, expected, str(ckpt_dir))
    return ModelCheckpoint(ckpt_dir, meta, config, {name: stored[name] for name in expected})


def write_model_checkpoint(out: Path, state: dict[str, torch.Tensor], config: BambaConfig, source: dict) -> Path:
    """Write framework tensors (Bamba.state_dict() names) as a committed checkpoint that the trainer
    loads with checkpoint.init_from=OUT and init_load=model; meta.json records the model config
    and where the weights came from."""
    check_shapes({k: v.shape for k, v in state.items()}, model_shapes(config), str(source.get("path", out)))
    meta = {"step": 0, "tokens_seen": 0, "world_size": 1,
            "model_config": dataclasses.asdict(runtime_neutral(config)), "source": source}
    return write_checkpoint(out, {f"model.{name}": tensor for name, tensor in state.items()}, meta)
