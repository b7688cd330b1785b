"""The training loop: `train(job_config)`.

Order of work: check everything that can be wrong with the config (before any process group or
device memory), start the process group, build the model on the meta device and shard it, build
optimizer / schedule / data loader, resume from the latest checkpoint, then step."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from data_loader import build_dataloader
from fms_bamba.checkpoint import CheckpointManager, check_init_from
from fms_bamba.config import ConfigError, JobConfig, config_to_dict, save_job_config
from fms_bamba.evaluate import Validator
from fms_bamba.generate import copy_tokenizer
from fms_bamba.metrics import MetricsLogger, device_peak_flops, peak_memory_gib
from fms_bamba.model import Bamba, BambaConfig, num_flops_per_token
from fms_bamba.model.float8 import SCALINGS as FLOAT8_SCALINGS, convert_to_float8
from fms_bamba.optim import (
    UpdateBesideForward,
    build_lr_scheduler,
    build_optimizer,
    copy_to_model,
    master_weights,
    validate_lr_scheduler,
)
from fms_bamba.parallel import (
    DTYPES,
    DistInfo,
    apply_parallelism,
    build_mesh,
    check_fsdp_options,
    dist_info_from_env,
    init_distributed,
    parse_activation_checkpoint,
    resolve_mesh_shape,
)
from fms_bamba.preemption import EXIT_PREEMPTED, PreemptionHandler
from fms_bamba.profiling import StepProfiler, profiled_steps

class TrainingDiverged(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


@dataclass
class TrainerState:
    """The loop's counters; saved in every checkpoint's meta.json."""

    step: int = 0
    """Optimizer steps completed (skipped ones included: their data was consumed)."""
    tokens_seen: int = 0
    """Training tokens consumed by the whole job."""
    skipped_steps: int = 0
    """Steps whose update was skipped because the loss or a gradient was not finite."""
    wandb_run_id: str = ""
    """The W&B run this job logs to, so a resumed job continues it."""

    def __post_init__(self) -> None:
        # Counted on the device between reads, so that a step needs no host sync: skips not yet
        # folded into skipped_steps, the current run of skips, and the longest run since last read.
        self._new_skips: torch.Tensor | int = 0
        self._streak: torch.Tensor | int = 0
        self._longest_streak: torch.Tensor | int = 0

    def record_step(self, skipped: torch.Tensor) -> None:
        """Count one optimizer step; `skipped` is a device bool."""
        skipped = skipped.long()
        self._new_skips = self._new_skips + skipped
        self._streak = (self._streak + 1) * skipped
        self._longest_streak = torch.where(self._streak > self._longest_streak, self._streak, self._longest_streak)

    def sync(self) -> None:
        """Fold the device-side skip count into `skipped_steps` (waits for the device)."""
        self.skipped_steps += int(self._new_skips)
        self._new_skips = 0

    def longest_skip_streak(self) -> int:
        """The longest run of consecutive skipped steps since the last call (waits for the device)."""
        longest, self._longest_streak = int(self._longest_streak), self._streak
        return longest

    def state_dict(self) -> dict:
        self.sync()
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def load_state_dict(self, state: dict) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, type(getattr(self, f.name))(state[f.name]))
        self.__post_init__()


@dataclass(frozen=True)
class BatchPlan:
    """How the global batch splits into micro-batches."""

    global_batch_sequences: int
    """Sequences per optimizer step over all ranks."""
    grad_accum_steps: int
    """Forward/backward passes of one micro-batch each per rank and optimizer step."""
    tokens_per_step: int
    """Tokens per optimizer step over all ranks."""


def plan_batch(cfg: JobConfig, world_size: int) -> BatchPlan:
    """Resolve the global batch; raises ConfigError naming the fields when ranks x micro-batch
    don't divide it."""
    training = cfg.training
    for name in ("seq_len", "micro_batch_size", "steps"):
        if getattr(training, name) < 1:
            raise ConfigError(f"training.{name} must be >= 1, got {getattr(training, name)}")
    if training.global_batch_sequences and training.global_batch_tokens:
        raise ConfigError("set only one of training.global_batch_sequences and training.global_batch_tokens")
    if training.global_batch_tokens:
        if training.global_batch_tokens % training.seq_len:
            raise ConfigError(f"training.global_batch_tokens ({training.global_batch_tokens}) must be a "
                              f"multiple of training.seq_len ({training.seq_len})")
        sequences = training.global_batch_tokens // training.seq_len
        field = "training.global_batch_tokens"
    else:
        sequences = training.global_batch_sequences or world_size * training.micro_batch_size
        field = "training.global_batch_sequences"
    per_pass = world_size * training.micro_batch_size
    if sequences < 0 or sequences % per_pass:
        raise ConfigError(f"{field} gives {sequences} sequences per step, which {world_size} processes x "
                          f"training.micro_batch_size {training.micro_batch_size} (= {per_pass}) don't divide")
    return BatchPlan(sequences, sequences // per_pass, sequences * training.seq_len)


def build_model_config(cfg: JobConfig) -> BambaConfig:
    # The data loader checks token ids against vocab_size, so the model needn't (a host sync).
    overrides = {"mixer_impl": cfg.model.mixer_impl, "attn_impl": cfg.model.attn_impl,
                 "doc_masking": cfg.model.doc_masking, "check_token_ids": False,
                 "max_seq_len": cfg.model.max_seq_len or cfg.training.seq_len}
    for name in ("vocab_size", "n_layers", "attn_layer_indices"):
        if getattr(cfg.model, name) is not None:
            overrides[name] = getattr(cfg.model, name)
    if overrides["max_seq_len"] < cfg.training.seq_len:
        raise ConfigError(f"model.max_seq_len ({cfg.model.max_seq_len}) is below training.seq_len "
                          f"({cfg.training.seq_len})")
    try:
        return BambaConfig.from_preset(cfg.model.preset, **overrides)
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"model: {err}") from None


def pick_device(cfg: JobConfig, info: DistInfo) -> torch.device:
    choice = cfg.training.device
    if choice not in ("auto", "cuda", "cpu"):
        raise ConfigError(f"training.device must be auto | cuda | cpu, got {choice!r}")
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("training.device is cuda but no CUDA device is visible")
    if info.local_rank >= torch.cuda.device_count():
        raise ConfigError(f"local rank {info.local_rank} has no GPU: only {torch.cuda.device_count()} visible")
    return torch.device("cuda", info.local_rank)


def resolve_data(cfg: JobConfig) -> None:
    """An empty `data.datasets` means the built-in corpus: build it (once) and point the config at it."""
    if cfg.data.datasets:
        return
    from fms_bamba.default_corpus import DATASET_NAME, default_corpus

    corpus = default_corpus()
    cfg.data.root, cfg.data.datasets, cfg.data.weights = str(corpus), [DATASET_NAME], []
    cfg.model.tokenizer = str(corpus / "tokenizer.json")


def check_job(cfg: JobConfig, info: DistInfo) -> tuple[BambaConfig, BatchPlan, torch.device]:
    """Every check that can fail on the config, cheap and before any process group or device memory."""
    device = pick_device(cfg, info)
    try:
        resolve_mesh_shape(cfg.parallelism, info.world_size)
        parse_activation_checkpoint(cfg.parallelism.activation_checkpoint)
        check_fsdp_options(cfg.parallelism, device.type)
        validate_lr_scheduler(cfg.lr_scheduler, peak_lr=cfg.optimizer.lr, total_steps=cfg.training.steps)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    plan = plan_batch(cfg, info.world_size)
    model_cfg = build_model_config(cfg)
    if cfg.training.dtype not in DTYPES:
        raise ConfigError(f"training.dtype must be one of {tuple(DTYPES)}, got {cfg.training.dtype!r}")
    if cfg.training.float8_scaling not in FLOAT8_SCALINGS:
        raise ConfigError(f"training.float8_scaling must be one of {FLOAT8_SCALINGS}, "
                          f"got {cfg.training.float8_scaling!r}")
    if cfg.training.float8 and device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 9):
            raise ConfigError(f"training.float8 needs fp8 matmuls (compute capability 8.9 or later); "
                              f"{torch.cuda.get_device_name(device)} has {capability}")
    if cfg.optimizer.master_weights and cfg.training.dtype == "float32":
        raise ConfigError("optimizer.master_weights keeps fp32 masters of a bf16 model: it needs training.dtype "
                          "bfloat16, got float32")
    if cfg.optimizer.moments_dtype not in DTYPES:
        raise ConfigError(f"optimizer.moments_dtype must be one of {tuple(DTYPES)}, "
                          f"got {cfg.optimizer.moments_dtype!r}")
    if cfg.optimizer.moments_dtype != "float32" and not cfg.optimizer.master_weights:
        raise ConfigError(f"optimizer.moments_dtype={cfg.optimizer.moments_dtype} needs optimizer.master_weights=true "
                          "(torch's fused AdamW keeps the moments in the parameters' dtype)")
    if cfg.optimizer.moments_dtype == "bfloat16":
        for name in ("beta1", "beta2"):  # bf16 rounds away a relative change below 2^-9..2^-8: the moment stalls
            decay = 1 - getattr(cfg.optimizer, name)
            if decay < 2 ** -7:
                raise ConfigError(f"optimizer.moments_dtype=bfloat16 would round away optimizer.{name}'s decay of "
                                  f"{decay:.4g} per step (bf16 keeps 8 significant bits): "
                                  f"use moments_dtype float32, or {name} <= {1 - 2 ** -7:.4f}")
    if cfg.optimizer.master_weights and plan.grad_accum_steps > 1:
        # FSDP would sum the micro-batches' gradients into the bf16 gradient shards.
        raise ConfigError(f"optimizer.master_weights keeps gradients in bf16, too coarse to accumulate "
                          f"{plan.grad_accum_steps} micro-batches per step in: set training.global_batch_sequences "
                          f"(or global_batch_tokens) to one micro-batch per process, or master_weights to false")
    if cfg.training.max_consecutive_skips < 1:
        raise ConfigError(f"training.max_consecutive_skips must be >= 1, got {cfg.training.max_consecutive_skips}")
    if cfg.training.max_grad_norm < 0:
        raise ConfigError(f"training.max_grad_norm must be >= 0, got {cfg.training.max_grad_norm}")
    if cfg.training.gc_interval < 0:
        raise ConfigError(f"training.gc_interval must be >= 0, got {cfg.training.gc_interval}")
    if cfg.metrics.log_interval < 1:
        raise ConfigError(f"metrics.log_interval must be >= 1, got {cfg.metrics.log_interval}")
    if cfg.profiling.start_step < 1 or cfg.profiling.steps < 1:
        raise ConfigError(f"profiling.start_step and profiling.steps must be >= 1, got "
                          f"{cfg.profiling.start_step} and {cfg.profiling.steps}")
    window = profiled_steps(cfg.profiling)
    if window and window[-1] > cfg.training.steps:
        raise ConfigError(f"profiling: steps {window.start}..{window[-1]} run past training.steps "
                          f"({cfg.training.steps})")
    if cfg.metrics.wandb_mode not in ("online", "offline"):
        raise ConfigError(f"metrics.wandb_mode must be online | offline, got {cfg.metrics.wandb_mode!r}")
    resolve_data(cfg)
    try:
        cfg.data.validate()
        cfg.validation.validate(log_interval=cfg.metrics.log_interval, tokenizer=cfg.model.tokenizer)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    try:  # only when this run has no checkpoint of its own: a resumed stage 2 no longer needs stage 1
        check_init_from(cfg.checkpoint, cfg.job.run_dir)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(str(err)) from None
    if cfg.model.tokenizer and not Path(cfg.model.tokenizer).exists():
        raise ConfigError(f"model.tokenizer: {cfg.model.tokenizer} does not exist")
    return model_cfg, plan, device


def global_grad_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """L2 norm of all gradients of the job, summed in fp32 whatever their dtype (FSDP2 shards are
    DTensors: reduce them too)."""
    norms = torch._foreach_norm([p.grad for p in params if p.grad is not None], 2, dtype=torch.float32)
    norm = torch.linalg.vector_norm(torch.stack(norms))
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def set_clipping_and_skipping(optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor, max_grad_norm: float,
                              skipped: torch.Tensor) -> None:
    """Clip to max_grad_norm (0 = off) and skip the update if `skipped`, both inside the fused
    AdamW kernel: it divides every gradient by `grad_scale` and leaves parameters and moments
    untouched where `found_inf` is 1. Clipping costs no pass of its own over the gradients."""
    if max_grad_norm > 0:
        # clip_grad_norm_'s factor min(1, max / (norm + 1e-6)), as a divisor
        optimizer.grad_scale = ((grad_norm.float() + 1e-6) / max_grad_norm).clamp(min=1.0)
    optimizer.found_inf = skipped.float()


def shared_run_id(info: DistInfo) -> str:
    """A fresh W&B run id drawn on rank 0 and agreed by all ranks."""
    run_id = [secrets.token_hex(4) if info.rank == 0 else None]
    dist.broadcast_object_list(run_id, src=0)
    return run_id[0]


def train(cfg: JobConfig) -> None:
    """Run (or resume) the job `cfg` describes, in this process as one rank of torchrun's job."""
    # Segments that grow in place rather than cached blocks of fixed sizes: near a full GPU the
    # latter fragment, and each failed allocation then frees the cache with a device sync.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    info = dist_info_from_env()
    model_cfg, plan, device = check_job(cfg, info)
    init_distributed(device, cfg.parallelism)
    try:
        _train(cfg, info, model_cfg, plan, device)
    finally:
        dist.destroy_process_group()


def build_model(model_cfg: BambaConfig, mesh: DeviceMesh, cfg: JobConfig, device: torch.device) -> tuple[Bamba, Bamba]:
    """Build on the meta device, apply parallelism, then materialise and initialise each shard.

    Returns the model and its weights of record (what the optimizer updates and the checkpoint
    saves): the model itself, or with optimizer.master_weights its fp32 masters, initialised
    as the fp32 model would be, with the model's bf16 parameters rounded from them."""
    torch.manual_seed(cfg.job.seed)
    with torch.device("meta"):
        model = Bamba(model_cfg)
    if cfg.training.float8:
        convert_to_float8(model, scaling=cfg.training.float8_scaling)
    masters = cfg.optimizer.master_weights
    compute_dtype = DTYPES[cfg.training.dtype] if device.type == "cuda" or masters else torch.float32
    if masters:  # before sharding, so FSDP's shards, gathers and gradients are all of this dtype
        model.to(compute_dtype)
    apply_parallelism(model, mesh, cfg.parallelism, param_dtype=compute_dtype)
    model.to_empty(device=device)
    weights = master_weights(model) if masters else model
    with torch.no_grad():
        weights.init_weights()
    if masters:
        copy_to_model(weights, model)
    model.train()
    return model, weights


class GarbageCollection:
    """Python's automatic collection off for the run, and a collection every `interval` steps
    instead: an automatic one pauses whichever rank allocates at the wrong moment, and the other
    ranks then wait for it at the next collective. Every rank collects at the same step."""

    def __init__(self, interval: int):
        self.interval = interval
        if interval:
            gc.disable()
            gc.collect()

    def step(self, step: int) -> None:
        if self.interval and step % self.interval == 0:
            gc.collect(1)  # the young generations: what the steps since the last one allocated

    def close(self) -> None:
        if self.interval:
            gc.enable()


def train_step(model: Bamba, optimizer: torch.optim.Optimizer, batches, *, plan: BatchPlan, cfg: JobConfig,
               device: torch.device, hsdp: bool, poison: bool,
               update: Callable[[], None]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward/backward over the micro-batches, clip, and an AdamW step (`update`: `optimizer.step`
    or an `UpdateBesideForward`) unless something is not finite. Returns device tensors (mean loss
    of the job's step, gradient norm, skipped); no host sync."""
    loss_sum = torch.zeros((), device=device)
    for micro in range(plan.grad_accum_steps):
        batch = {key: value.to(device, non_blocking=True) for key, value in next(batches).items()}
        if hsdp:
            # Replicas all-reduce gradients once per step, not once per micro-batch.
            sharding = getattr(model, "per_param_sharding", model)  # ours, or FSDP2's root module
            sharding.set_requires_all_reduce(micro == plan.grad_accum_steps - 1)
        loss = model(batch["input_ids"], doc_ids=batch["doc_ids"] if cfg.model.doc_masking else None,
                     labels=batch["labels"])
        if poison:
            loss = loss * float("nan")
        (loss / plan.grad_accum_steps).backward()
        loss_sum += loss.detach()
    # A device collective, not a host sync; it also makes every rank agree on skipping.
    dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
    step_loss = loss_sum / (plan.grad_accum_steps * dist.get_world_size())

    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm = global_grad_norm(params)
    skipped = ~(torch.isfinite(grad_norm) & torch.isfinite(step_loss))
    set_clipping_and_skipping(optimizer, grad_norm, cfg.training.max_grad_norm, skipped)
    update()
    optimizer.zero_grad(set_to_none=True)
    return step_loss, grad_norm, skipped


def _train(cfg: JobConfig, info: DistInfo, model_cfg: BambaConfig, plan: BatchPlan, device: torch.device) -> None:
    run_dir = Path(cfg.job.run_dir)
    if info.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_job_config(cfg, run_dir / "config.yaml")
        if cfg.model.tokenizer:  # RUN_DIR/tokenizer/: generation needs nothing else
            copy_tokenizer(cfg.model.tokenizer, run_dir / "tokenizer")

    mesh = build_mesh(cfg.parallelism, device)
    model, weights = build_model(model_cfg, mesh, cfg, device)
    optimizer = build_optimizer(model, cfg.optimizer, weights=weights)
    update = UpdateBesideForward(model, optimizer) if cfg.optimizer.overlap_step else optimizer.step
    lr_scheduler = build_lr_scheduler(optimizer, cfg.lr_scheduler, peak_lr=cfg.optimizer.lr,
                                      total_steps=cfg.training.steps)
    data_loader = build_dataloader(cfg.data, rank=info.rank, world_size=info.world_size,
                                   seq_len=cfg.training.seq_len, micro_batch_size=cfg.training.micro_batch_size,
                                   vocab_size=model_cfg.vocab_size)
    state = TrainerState()
    validator = Validator(cfg, model, rank=info.rank, world_size=info.world_size, device=device)
    ckpt = CheckpointManager(cfg.checkpoint, run_dir, model=weights, optimizer=optimizer,
                             lr_scheduler=lr_scheduler, data_loader=data_loader, trainer_state=state,
                             job_config=config_to_dict(cfg))
    # Signal handlers, the metrics file and the W&B run are released however the loop ends.
    with contextlib.ExitStack() as cleanup:
        preemption = PreemptionHandler()
        cleanup.callback(preemption.close)
        if ckpt.load() and weights is not model:
            copy_to_model(weights, model)
        if not state.wandb_run_id:
            state.wandb_run_id = shared_run_id(info)
        logger = MetricsLogger(cfg.metrics, run_dir, rank=info.rank, total_steps=cfg.training.steps,
                               start_step=state.step, wandb_run_id=state.wandb_run_id,
                               run_name=cfg.job.description, config=config_to_dict(cfg))
        cleanup.callback(logger.close)
        if info.rank == 0:
            print(f"training Bamba {cfg.model.preset}: "
                  f"{sum(p.numel() for p in model.parameters()):,} parameters on {info.world_size} x {device.type}, "
                  f"global batch {plan.global_batch_sequences} x {cfg.training.seq_len} tokens "
                  f"({plan.grad_accum_steps} micro-batches per rank), steps {state.step + 1}..{cfg.training.steps}, "
                  f"run dir {run_dir}", flush=True)
            # What the whole run reads of each source: a source that would repeat is seen before the run starts.
            for source in data_loader.reading_plan(cfg.training.steps * plan.global_batch_sequences):
                print(f"  data {source['name']} (weight {source['weight']:.4g}): reads {source['tokens']:,} of its "
                      f"{source['epoch_tokens']:,} tokens by step {cfg.training.steps} "
                      f"({source['epochs']:.3g} epochs)", flush=True)

        flops_per_token = num_flops_per_token(model_cfg, cfg.training.seq_len)
        peak_flops = device_peak_flops(device, cfg.metrics.peak_tflops)
        nan_steps = set(cfg.training.debug_nan_at_steps)
        batches = iter(data_loader)
        # Async saves' host memory, allocated beside the first step; after the loader's workers are
        # forked, so that no fork happens while the stager's thread holds a lock.
        ckpt.prepare_staging()
        profiler = StepProfiler(cfg.profiling, run_dir, info.rank, first_step=state.step + 1)
        cleanup.callback(profiler.close)
        garbage = GarbageCollection(cfg.training.gc_interval)
        cleanup.callback(garbage.close)
        interval_start, interval_steps = time.perf_counter(), 0
        # Sum and count of the finite step losses since the last record, kept on the device.
        interval_loss, interval_finite = torch.zeros((), device=device), torch.zeros((), device=device)

        for step in range(state.step + 1, cfg.training.steps + 1):
            step_lr = lr_scheduler.current_lr()
            profiler.before_step(step)
            step_loss, grad_norm, skipped = train_step(model, optimizer, batches, plan=plan, cfg=cfg, device=device,
                                                       hsdp=mesh.ndim == 2, poison=step in nan_steps, update=update)
            lr_scheduler.step()
            state.step = step
            state.tokens_seen += plan.tokens_per_step
            state.record_step(skipped)
            interval_loss += torch.where(skipped, 0.0, step_loss)
            interval_finite += (~skipped).float()
            logger.advance()
            interval_steps += 1
            interval_start += profiler.after_step(step)  # the trace's export is not training time
            garbage.step(step)

            last = step == cfg.training.steps
            if step % cfg.metrics.log_interval == 0 or last:
                state.sync()
                streak = state.longest_skip_streak()
                if streak >= cfg.training.max_consecutive_skips:
                    raise TrainingDiverged(
                        f"{streak} optimizer steps in a row had a non-finite loss or gradient "
                        f"(training.max_consecutive_skips={cfg.training.max_consecutive_skips}; last logged step "
                        f"{step}, {state.skipped_steps} skipped in all): lower optimizer.lr or check the data")
                elapsed = time.perf_counter() - interval_start
                tokens_per_sec_per_gpu = interval_steps * plan.tokens_per_step / elapsed / info.world_size
                finite_steps = int(interval_finite.item())
                logger.log({
                    "step": step, "loss": interval_loss.item() / finite_steps if finite_steps else None,
                    "lr": step_lr, "grad_norm": grad_norm.item(),
                    "tokens_seen": state.tokens_seen, "tokens_per_sec_per_gpu": tokens_per_sec_per_gpu,
                    "mfu": tokens_per_sec_per_gpu * flops_per_token / peak_flops if peak_flops else None,
                    "mem_gib": peak_memory_gib(device), "skipped_steps": state.skipped_steps,
                    **validator(step),  # held-out loss, when due, outside the timed interval
                })
                interval_start, interval_steps = time.perf_counter(), 0
                interval_loss.zero_()
                interval_finite.zero_()

            # A signal during the last step changes nothing: the run ends complete (exit 0), not preempted.
            stop = preemption.stop_requested() and not last
            ckpt.save(step, force=stop or last)
            if stop:
                ckpt.close()
                if info.rank == 0:
                    print(f"preempted: saved step {step}, exiting with code {EXIT_PREEMPTED}", flush=True)
                sys.exit(EXIT_PREEMPTED)

        ckpt.close()
