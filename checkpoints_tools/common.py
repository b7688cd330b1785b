"""What every command shares: dtype names, output paths, a checkpoint's model config, the check of
tensors against that config, and writing an imported model as a committed checkpoint."""

from __future__ import annotations

import dataclasses
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from fms_bamba.checkpoint import write_checkpoint
from fms_bamba.model import Bamba, BambaConfig

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}
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


def runtime_neutral(config: BambaConfig) -> BambaConfig:
    """`config` with the compute-path choices reset: they belong to a run, not to the weights, and
    'kernels' / 'flash' would demand GPU packages just to read shapes."""
    return dataclasses.replace(config, mixer_impl="auto", attn_impl="auto")


def model_config_of(meta: dict, source: str | os.PathLike) -> BambaConfig:
    """The model config a checkpoint's meta.json records.

    Checkpoints written by these tools carry `model_config` (BambaConfig's fields); the trainer's
    carry the job config, from which the model config is built as the trainer builds it.
    """
    if isinstance(meta.get("model_config"), dict):
        try:
            return runtime_neutral(BambaConfig(**meta["model_config"]))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: meta.json model_config is not a valid BambaConfig ({err})") from None
    job = meta.get("config")
    if isinstance(job, dict) and isinstance(job.get("model"), dict):
        from fms_bamba.config import ConfigError, load_job_config
        from fms_bamba.train import build_model_config

        overrides = {f"model.{key}": value for key, value in job["model"].items()}
        seq_len = (job.get("training") or {}).get("seq_len")
        if seq_len is not None:
            overrides["training.seq_len"] = seq_len
        try:
            return runtime_neutral(build_model_config(load_job_config(None, overrides)))
        except ConfigError as err:
            raise ValueError(f"{source}: meta.json's job config does not give a model ({err})") from None
    raise ValueError(f"{source}: meta.json records neither a model_config nor a job config with a model section")


def write_model_checkpoint(out: Path, state: dict[str, torch.Tensor], config: BambaConfig, source: dict) -> Path:
    """Write framework tensors (Bamba.state_dict() names) as a committed checkpoint that the trainer
    loads with checkpoint.init_from=OUT and init_load=model; meta.json records the model config
    and where the weights came from."""
    check_shapes({k: v.shape for k, v in state.items()}, model_shapes(config), str(source.get("path", out)))
    meta = {"step": 0, "tokens_seen": 0, "world_size": 1,
            "model_config": dataclasses.asdict(runtime_neutral(config)), "source": source}
    return write_checkpoint(out, {f"model.{name}": tensor for name, tensor in state.items()}, meta)
