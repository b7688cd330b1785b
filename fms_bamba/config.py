"""The job config: plain dataclass sections, mirrored 1:1 by the YAML files in configs/ and
overridable from the command line as ``--section.field=value``."""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from data_loader import DataConfig
from fms_bamba.checkpoint import CheckpointConfig
from fms_bamba.evaluate import ValidationConfig


@dataclass
class JobSection:
    """Where the run lives and what makes it reproducible."""

    run_dir: str = "runs/default"
    """Run directory: config.yaml, metrics.jsonl, checkpoints/, tokenizer/; relaunching resumes from it."""
    seed: int = 0
    """Seed for model initialisation (the data order has its own seed in `data.seed`)."""
    description: str = ""
    """Free text kept with the run (also the W&B run name when set)."""


@dataclass
class ModelSection:
    """Which model: a preset of `BambaConfig` and the fields a user sets on top of it."""

    preset: str = "tiny"
    """`BambaConfig` preset: tiny | bamba-1b | bamba-9b."""
    vocab_size: int | None = None
    """Vocabulary size; null = the preset's (must cover every token id of the data)."""
    max_seq_len: int | None = None
    """Longest sequence the model accepts; null = training.seq_len."""
    n_layers: int | None = None
    """Decoder blocks; null = the preset's (fewer: the preset's width at a depth one GPU can hold)."""
    attn_layer_indices: list[int] | None = None
    """Which blocks are attention (0-based); null = the preset's."""
    mixer_impl: str = "auto"
    """Mamba-2 mixer implementation: auto (kernels on CUDA when installed) | reference | kernels."""
    attn_impl: str = "auto"
    """Attention implementation: auto | sdpa | flash."""
    doc_masking: bool = False
    """Reset SSM state and mask attention at packed-document boundaries (uses the batch's doc_ids)."""
    tokenizer: str = ""
    """tokenizer.json, or a directory of tokenizer files, copied to RUN_DIR/tokenizer/ ("" = none; the built-in corpus sets its own)."""


@dataclass
class TrainingSection:
    """Batch shape, length of the run and the numerical safeguards of a step."""

    seq_len: int = 256
    """Tokens per training sequence."""
    micro_batch_size: int = 8
    """Sequences per rank per forward/backward pass."""
    global_batch_sequences: int = 0
    """Sequences per optimizer step over all ranks (0 = ranks x micro_batch_size, unless global_batch_tokens is set)."""
    global_batch_tokens: int = 0
    """Tokens per optimizer step over all ranks (alternative to global_batch_sequences; a multiple of seq_len)."""
    steps: int = 300
    """Optimizer steps of the whole run (also the length of the LR schedule)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (0 = no clipping)."""
    dtype: str = "bfloat16"
    """Parameter/compute dtype on GPU (bfloat16 | float32); gradients reduce in float32, CPU computes in float32."""
    float8: bool = False
    """MLP and Mamba-2 in_proj matmuls of training steps in fp8, scaled as float8_scaling (coarser than bf16); CUDA: sm89+."""
    float8_scaling: str = "tensorwise"
    """With float8: tensorwise (one scale per tensor, gradients e5m2) | rowwise (one per row of each operand, all e4m3)."""
    max_consecutive_skips: int = 10
    """Stop with an error after this many optimizer steps in a row had a non-finite loss or gradient."""
    device: str = "auto"
    """auto (CUDA when available) | cuda | cpu."""
    gc_interval: int = 50
    """Python's automatic garbage collection off; collect every N steps, at the same step on every rank (0 = automatic)."""
    debug_nan_at_steps: list[int] = field(default_factory=list)
    """Test hook: make the loss NaN at these steps (1-based) to exercise step skipping."""


@dataclass
class OptimizerSection:
    """AdamW (a fused kernel either way: it skips a non-finite step without a host sync)."""

    lr: float = 3e-3
    """Peak learning rate."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay (A_log, D, dt_bias, norms and biases take none)."""
    overlap_step: bool = False
    """CUDA: update one FSDP unit at a time on a stream of its own, beside the next step's forward (same math)."""
    master_weights: bool = False
    """Keep the model's parameters in training.dtype and fp32 masters in the optimizer (gathers and gradients need no casts)."""
    moments_dtype: str = "float32"
    """With master_weights: AdamW's two moments in float32 | bfloat16 (half their memory and update traffic, coarser)."""


@dataclass
class LRSchedulerSection:
    """Warmup, then a decay to a floor over training.steps."""

    warmup_steps: int = 30
    """Steps of warmup from ~0 to optimizer.lr."""
    warmup_shape: str = "linear"
    """linear | quadratic."""
    decay: str = "cosine"
    """After warmup: cosine | linear | constant | wsd (warmup-stable-decay, linear decay at the end)."""
    min_lr: float = 3e-4
    """Floor the decay ends at (absolute learning rate)."""
    wsd_decay_fraction: float = 0.2
    """wsd only: fraction of training.steps spent in the final decay."""


@dataclass
class ParallelismSection:
    """How ranks split the model: FSDP2 / HSDP, activation checkpointing, compilation."""

    dp_replicate: int = 1
    """Replicas (HSDP: usually nodes); gradients are all-reduced across them."""
    dp_shard: int = -1
    """Ranks each replica is sharded over (-1 = world size / dp_replicate)."""
    activation_checkpoint: str = "none"
    """none | full | every-N (recompute every N-th decoder block, e.g. every-2)."""
    compile: bool = False
    """torch.compile each decoder block."""
    reshard_after_forward: str = "default"
    """Which blocks free their gathered params after forward: default (all but the last) | always |
    never (none: one all-gather per micro-batch instead of two, for the whole model's gathered
    params in memory) | keep-last-N (all but the last N)."""
    reduce_dtype: str = "float32"
    """Gradient reduce-scatter dtype: float32 | bfloat16 (half the bytes; sums over many ranks lose bits)."""
    all_gather: str = "nccl"
    """How parameters are gathered: nccl (NCCL's kernels, on SMs) | copy-engine (NCCL's copy-engine
    all-gather into symmetric memory: no SM time; one node, CUDA, NCCL >= 2.28)."""
    sharding: str = "fsdp2"
    """fsdp2 (torch's fully_shard: each collective goes through one packed buffer, copied in and out) |
    per-param (ours: each parameter's collectives read and write it in place)."""


@dataclass
class ProfilingSection:
    """torch.profiler traces of a few steps, to see where step time goes."""

    enable: bool = False
    """Record steps start_step .. start_step + steps - 1 on every rank into RUN_DIR/profile/."""
    start_step: int = 10
    """First step recorded (after compilation and warm-up)."""
    steps: int = 2
    """How many steps to record."""


@dataclass
class MetricsSection:
    """What is logged and where."""

    log_interval: int = 10
    """Log (console, metrics.jsonl, W&B) every N steps; the only steps that wait for the device."""
    progress_bar: bool = True
    """Show a tqdm progress bar on rank 0 when stderr is a terminal."""
    peak_tflops: float = 0.0
    """Per-device peak TFLOP/s for MFU; 0 = known GPUs' bf16 peak (H100/H200: 989), 1.0 on CPU."""
    wandb: bool = False
    """Log to Weights & Biases."""
    wandb_project: str = "fms-bamba"
    """W&B project."""
    wandb_entity: str = ""
    """W&B entity (team); empty = the user's default."""
    wandb_mode: str = "offline"
    """online | offline (offline runs need no network; `wandb sync` uploads them later)."""


@dataclass
class JobConfig:
    """Everything one training run needs; `fms-bamba train` with no arguments runs its defaults."""

    job: JobSection = field(default_factory=JobSection)
    """Run directory, seed, description."""
    model: ModelSection = field(default_factory=ModelSection)
    """Model preset and overrides."""
    data: DataConfig = field(default_factory=lambda: DataConfig(shuffle_buffer=1024))
    """Data sources and mixture (an empty `datasets` list means the built-in Python-stdlib corpus)."""
    training: TrainingSection = field(default_factory=TrainingSection)
    """Batch, steps, clipping, dtype."""
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    """AdamW."""
    lr_scheduler: LRSchedulerSection = field(default_factory=LRSchedulerSection)
    """Learning-rate schedule."""
    parallelism: ParallelismSection = field(default_factory=ParallelismSection)
    """FSDP2/HSDP, activation checkpointing, compile."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving, resuming and continued training."""
    metrics: MetricsSection = field(default_factory=MetricsSection)
    """Logging."""
    profiling: ProfilingSection = field(default_factory=ProfilingSection)
    """Step traces for performance work."""
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    """Held-out loss and sample completions during training."""


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message names it."""


def load_job_config(path: str | os.PathLike | None = None,
                    overrides: Mapping[str, Any] | Sequence[str] = ()) -> JobConfig:
    """Read a YAML job config (None = the defaults) and apply ``section.field`` overrides.

    `overrides` is a mapping ``{"training.steps": 10}`` or strings ``"training.steps=10"``
    (values parsed as YAML). Every key must exist; values are converted to the field's type."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(raw).__name__}")
    # The file alone first, so that an error names where it comes from.
    cfg = _build(JobConfig, raw, prefix="", where=f" (in {path})" if path is not None else "")
    items = list(_override_items(overrides))
    if not items:
        return cfg
    for key, value in items:
        _set_dotted(raw, key, value)
    return _build(JobConfig, raw, prefix="", where=" (command-line override)")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A plain dict of builtin types (YAML/JSON-ready) from a config dataclass."""
    def plain(value):
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value
    return plain(cfg)


def save_job_config(cfg: JobConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML that `load_job_config` reads back to an equal config."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def field_docs(cls: type) -> dict[str, str]:
    """Each field's one-line docstring (the string literal under it in the class body), by name."""
    body = ast.parse(inspect.getsource(cls).lstrip()).body[0].body
    return {node.target.id: " ".join(after.value.value.split())
            for node, after in zip(body, body[1:])
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)}


def describe_job_config(cfg: JobConfig | None = None) -> str:
    """Every field of JobConfig, section by section, with its value in `cfg` (default: the
    built-in defaults) and its docstring: what `fms-bamba train [CONFIG] --help` prints."""
    lines: list[str] = []

    def describe(value: Any, prefix: str) -> None:
        docs = field_docs(type(value))
        for item in dataclasses.fields(value):
            key, current = f"{prefix}{item.name}", getattr(value, item.name)
            if dataclasses.is_dataclass(current):  # a section, or a section inside one
                lines.append(f"\n{key}: {docs.get(item.name, '')}")
                describe(current, f"{key}.")
                continue
            text = yaml.safe_dump(current, default_flow_style=True, width=10**6).strip()
            lines.append(f"  --{key}={text.removesuffix('...').strip()}")
            lines.append(f"      {docs.get(item.name, '')}")

    describe(cfg or JobConfig(), "")
    return "\n".join(lines)


def replace_fields(base: Any, overrides: Sequence[str], *, where: str = "") -> Any:
    """A copy of the dataclass `base` with `field=value` overrides applied, each value read and
    typed as the job config's are (unknown fields are errors naming the closest one)."""
    return _build(type(base), dict(_override_items(overrides)), prefix="", where=where, base=base)


def _override_items(overrides: Mapping[str, Any] | Sequence[str]):
    if isinstance(overrides, Mapping):
        yield from overrides.items()
        return
    for item in overrides:
        key, sep, text = item.lstrip("-").partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        yield key, yaml.safe_load(text)


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.replace("-", "_").split(".")
    if len(parts) < 2:
        raise ConfigError(f"override key {key!r} must name section.field, e.g. training.steps")
    node = raw
    for part in parts[:-1]:
        child = node[part] = {} if node.get(part) is None else node[part]
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: Any, *, prefix: str, where: str, base: Any = None):
    """`cls` from a mapping; fields it leaves out keep `base`'s values (else `cls`'s defaults)."""
    raw = {} if raw is None else raw  # a section whose fields are all commented out
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping{where}, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            raise ConfigError(f"unknown config key {prefix}{key}{where}{hint}")
    values = {}
    for name in (name for name in fields if name in raw):
        factory = fields[name].default_factory
        if dataclasses.is_dataclass(hints[name]) and factory is not dataclasses.MISSING:
            # A section given in part keeps JobConfig's defaults for the rest (e.g. data.shuffle_buffer).
            values[name] = _build(hints[name], raw[name], prefix=f"{prefix}{name}.", where=where, base=factory())
        else:
            values[name] = _coerce(raw[name], hints[name], f"{prefix}{name}", where)
    try:
        return dataclasses.replace(base, **values) if base is not None else cls(**values)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}{where}: {err}") from None


def _coerce(value: Any, hint: Any, key: str, where: str) -> Any:
    """Convert `value` (from YAML or the command line) to the annotated type, or say why not.

    JobConfig's leaf fields are bool, int, float, str, lists of those, and `X | None`; BambaConfig
    (benchmarks' `--set`) adds `tuple[X, ...]`, read as a list."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            return None
        return _coerce(value, next(arg for arg in args if arg is not type(None)), key, where)
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}{where} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return tuple(_coerce(value, list[args[0]], key, where))
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        raise ConfigError(f"{key}{where}: fields of type {hint} cannot be set from a config")
    raise ConfigError(f"{key}{where} must be {getattr(hint, '__name__', hint)}, got {value!r}")
