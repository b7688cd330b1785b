"""AdamW over the model's parameter groups, and the learning-rate schedules."""

from __future__ import annotations

import functools
import math

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX

from fms_bamba.config import LRSchedulerSection, OptimizerSection
from fms_bamba.model import Bamba, optimizer_param_groups
from fms_bamba.parallel import DTYPES
from fms_bamba.staging import local_shard

WARMUP_SHAPES = ("linear", "quadratic")
DECAYS = ("cosine", "linear", "constant", "wsd")


def build_optimizer(model: nn.Module, cfg: OptimizerSection, *, weights: nn.Module | None = None) -> torch.optim.AdamW:
    """Fused AdamW (CPU and CUDA) with weight decay only where `optimizer_param_groups` puts it:
    torch's over the model's parameters, or, with optimizer.master_weights, `MasterWeightAdamW`
    over `weights` (from `master_weights`).

    Fused, because its step honours `optimizer.found_inf`: the trainer skips a non-finite step
    on the device, without waiting for it."""
    if cfg.master_weights:
        if weights is None:
            raise ValueError("optimizer.master_weights: pass the masters (build_model's weights) as `weights`")
        return MasterWeightAdamW(model, weights, cfg)
    groups = optimizer_param_groups(model, cfg.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                  weight_decay=cfg.weight_decay, fused=True)
    init_adamw_state(optimizer)
    return optimizer


def init_adamw_state(optimizer: torch.optim.AdamW, moments_dtype: torch.dtype | None = None) -> None:
    """Create AdamW's state as its first step would (step 0, zero moments, in `moments_dtype` or
    the parameter's), so that the state exists before any step: a checkpoint loads into it, and
    its host copy can be allocated at the start of a run (`CheckpointManager.prepare_staging`).
    DCP would otherwise make it with a step at lr 0, which counts as step 1 in the bias correction."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            optimizer.state[param] = {
                "step": torch.zeros((), dtype=torch.float32, device=param.device),  # fused AdamW's dtype
                "exp_avg": torch.zeros_like(param, dtype=moments_dtype),
                "exp_avg_sq": torch.zeros_like(param, dtype=moments_dtype)}


def master_weights(model: Bamba) -> Bamba:
    """An fp32 Bamba, never run, whose (uninitialised) parameters are sharded as `model`'s are:
    the weights AdamW updates and the checkpoint saves when the model's own are bf16. Being a
    Bamba, it has the model's parameter names and its `init_weights`."""
    with torch.device("meta"):
        weights = Bamba(model.config)
    for name, param in _named_parameters(model):
        module_name, _, leaf = name.rpartition(".")
        setattr(weights.get_submodule(module_name), leaf,
                nn.Parameter(torch.empty_like(param, dtype=torch.float32), requires_grad=param.requires_grad))
    return weights


def _named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The model's parameters under Bamba's own names (activation checkpointing's prefix dropped)."""
    return [(name.replace(_CHECKPOINT_PREFIX, ""), param) for name, param in model.named_parameters()]


def paired_parameters(model: nn.Module, weights: nn.Module) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """(master, parameter) for each of the model's parameters, paired by name."""
    return [(weights.get_parameter(name), param) for name, param in _named_parameters(model)]


@torch.no_grad()
def copy_to_model(weights: nn.Module, model: nn.Module) -> None:
    """Set the model's parameters to its masters, rounded to the parameters' dtype."""
    for master, param in paired_parameters(model, weights):
        param.copy_(master)


def adamw_with_masters(masters: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                       exp_avg_sqs: list[torch.Tensor], params: list[torch.Tensor], steps: list[torch.Tensor],
                       lr: torch.Tensor, grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None, *,
                       beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """One AdamW step, in place, in fused AdamW's order of operations: the fp32 master, both
    moments and the step count are updated from a (bf16) gradient divided by `grad_scale`, and
    the (bf16) parameter set to the new master; nothing changes where `found_inf` is 1. The math
    is fp32 whatever the moments' dtype; bf16 moments are rounded once, when written back.
    Compiled, each tensor's update is one pass over memory."""
    for master, grad, exp_avg, exp_avg_sq, param, step in zip(masters, grads, exp_avgs, exp_avg_sqs, params, steps):
        g = grad.float() if grad_scale is None else grad.float() / grad_scale
        new_step = step + 1
        new_exp_avg = exp_avg.float() * beta1 + g * (1 - beta1)
        new_exp_avg_sq = exp_avg_sq.float() * beta2 + g * g * (1 - beta2)
        denom = new_exp_avg_sq.sqrt() / (1 - beta2 ** new_step).sqrt() + eps
        new_master = master - lr * weight_decay * master - lr / (1 - beta1 ** new_step) * new_exp_avg / denom
        if found_inf is not None:
            skip = found_inf > 0
            new_step = torch.where(skip, step, new_step)
            new_exp_avg = torch.where(skip, exp_avg, new_exp_avg)
            new_exp_avg_sq = torch.where(skip, exp_avg_sq, new_exp_avg_sq)
            new_master = torch.where(skip, master, new_master)
        step.copy_(new_step)
        exp_avg.copy_(new_exp_avg)
        exp_avg_sq.copy_(new_exp_avg_sq)
        master.copy_(new_master)
        param.copy_(new_master)


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW over fp32 masters (`master_weights`) of a model whose parameters are bf16, the way
    Megatron keeps main parameters: FSDP then gathers the bf16 shards as they are and reduces
    gradients into bf16 shards, with none of the casts it makes around an fp32 shard. The update
    reads each bf16 gradient once and writes the master, both moments and the bf16 parameter in
    the same pass (`adamw_with_masters`, compiled on CUDA), which torch's fused AdamW cannot: it
    wants parameters and gradients of one dtype.

    Its param groups hold the masters, and its state has torch's AdamW keys, so a checkpoint of
    `weights` and this optimizer has the same layout as one of an fp32 model and torch's AdamW
    (with `optimizer.moments_dtype=bfloat16`, the moments saved as bf16: either kind of run
    resumes from the other's checkpoints, the moments cast on load).
    Honours `grad_scale` and `found_inf` as the fused kernel does."""

    def __init__(self, model: nn.Module, weights: nn.Module, cfg: OptimizerSection):
        super().__init__(optimizer_param_groups(weights, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                         eps=cfg.eps, weight_decay=cfg.weight_decay, fused=True)
        self.param_of = {master: param for master, param in paired_parameters(model, weights)}
        self.moments_dtype = DTYPES[cfg.moments_dtype]
        init_adamw_state(self, self.moments_dtype)
        cuda = next(iter(self.param_of)).device.type == "cuda"
        self.update = torch.compile(adamw_with_masters, fullgraph=True) if cuda else adamw_with_masters

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.param_of.values():
            param.grad = None

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # which casts every moment to its master's dtype, fp32
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = state[key].to(self.moments_dtype)

    @torch.no_grad()
    def step(self, closure=None) -> None:
        if closure is not None:
            raise ValueError("MasterWeightAdamW.step takes no closure")
        for group in self.param_groups:
            masters = [m for m in group["params"] if self.param_of[m].grad is not None]
            if not masters:
                continue
            params = [self.param_of[m] for m in masters]
            states = [self.state[m] for m in masters]
            beta1, beta2 = group["betas"]
            self.update([local_shard(m) for m in masters], [local_shard(p.grad) for p in params],
                        [local_shard(s["exp_avg"]) for s in states], [local_shard(s["exp_avg_sq"]) for s in states],
                        [local_shard(p) for p in params], [s["step"] for s in states],
                        torch.full((), group["lr"], device=local_shard(masters[0]).device),  # a tensor: no recompile as it moves
                        getattr(self, "grad_scale", None), getattr(self, "found_inf", None),
                        beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])


class UpdateBesideForward:
    """The optimizer's step, one FSDP unit at a time in forward order (the root's own parameters,
    then each block's), on a CUDA stream of its own: the next step's forward starts as soon as the
    root's update is done, and before each block's all-gather FSDP's streams wait for that block's
    update only, so the rest of the memory-bound AdamW runs beside the forward's matmuls.

    The update is the same as one `optimizer.step()`: the fused kernel treats each tensor on its
    own, and the clipping divisor and skip flag (`grad_scale`, `found_inf`) are global. Without
    CUDA the units are stepped in turn on the current stream.

    FSDP's all-gather streams run in order, so once a block's forward has waited, every later
    gather of it (backward, the evaluation's decoding) follows the update too. Anything gathering a
    block before its next forward must synchronize first (a checkpoint's copy does). Under
    parallelism.sharding=per-param each unit keeps its event and its next all-gather waits for
    it, which also covers a gather prefetched before the block's own forward."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer
        blocks = list(model.layers)
        in_blocks = {p for block in blocks for p in block.parameters()}
        units = [{p for p in model.parameters() if p not in in_blocks}] + [set(b.parameters()) for b in blocks]
        param_of = getattr(optimizer, "param_of", {})  # a MasterWeightAdamW's groups hold masters
        # Per unit, what the optimizer updates in each param group (in the group's order; a group may be empty).
        self.unit_groups = [[[p for p in group["params"] if param_of.get(p, p) in unit]
                             for group in optimizer.param_groups] for unit in units]
        self.params = [param_of.get(p, p) for groups in self.unit_groups for params in groups for p in params]
        self.stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        self.block_events: list[torch.cuda.Event | None] = [None] * len(blocks)
        # parallelism.sharding=per-param: its units (the root, then the blocks, as here) take the events.
        self.sharding = getattr(model, "per_param_sharding", None)
        if self.stream is not None and self.sharding is None:
            for index, block in enumerate(blocks):  # before FSDP's own pre-forward, which all-gathers
                block.register_forward_pre_hook(functools.partial(self._before_block, index), prepend=True)

    def __call__(self) -> None:
        if self.stream is None:
            for groups in self.unit_groups:
                self._step_unit(groups)
            return
        self.stream.wait_stream(torch.cuda.current_stream())  # gradients, their norm, the skip flag
        # What the update reads is freed on the training streams once the step returns (zero_grad,
        # the next step's clipping divisor): its memory must not be reused until the update ran.
        for p in self.params:
            if p.grad is not None:
                local_shard(p.grad).record_stream(self.stream)
        for name in ("grad_scale", "found_inf"):
            if isinstance(getattr(self.optimizer, name, None), torch.Tensor):
                getattr(self.optimizer, name).record_stream(self.stream)
        with torch.cuda.stream(self.stream):
            for index, groups in enumerate(self.unit_groups):
                self._step_unit(groups)
                event = self.stream.record_event()
                if self.sharding is not None:  # the unit's next all-gather waits for it, prefetched or not
                    self.sharding.units[index].update_event = event
                elif index == 0:  # the root's all-gather (embedding, final norm, LM head) waits for it
                    self.model.set_post_optim_event(event)
                else:
                    self.block_events[index - 1] = event

    def _step_unit(self, groups: list[list[torch.nn.Parameter]]) -> None:
        all_groups = self.optimizer.param_groups
        self.optimizer.param_groups = [{**group, "params": params} for group, params in zip(all_groups, groups)
                                       if params]
        try:
            self.optimizer.step()
        finally:
            self.optimizer.param_groups = all_groups

    @torch.compiler.disable
    def _before_block(self, index: int, block: torch.nn.Module, args: tuple) -> None:
        event, self.block_events[index] = self.block_events[index], None
        if event is not None:
            comm = block._get_fsdp_state()._comm_ctx  # FSDP2's all-gather streams (made at its lazy init)
            comm.all_gather_copy_in_stream.wait_event(event)
            comm.all_gather_stream.wait_event(event)


def lr_at(step: int, *, peak_lr: float, total_steps: int, cfg: LRSchedulerSection) -> float:
    """Learning rate of the optimizer step that follows `step` completed steps (0-based)."""
    if step < cfg.warmup_steps:
        fraction = (step + 1) / cfg.warmup_steps
        return peak_lr * (fraction if cfg.warmup_shape == "linear" else fraction ** 2)
    if cfg.decay == "constant":
        return peak_lr
    if cfg.decay == "wsd":
        decay_steps = max(1, round(cfg.wsd_decay_fraction * total_steps))
        decay_start = max(cfg.warmup_steps, total_steps - decay_steps)
        if step < decay_start:
            return peak_lr
        progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
        return peak_lr + (cfg.min_lr - peak_lr) * progress
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    if cfg.decay == "linear":
        return peak_lr + (cfg.min_lr - peak_lr) * progress
    return cfg.min_lr + (peak_lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def validate_lr_scheduler(cfg: LRSchedulerSection, *, peak_lr: float, total_steps: int) -> None:
    """Raise ValueError naming the field that makes the schedule meaningless."""
    if cfg.warmup_shape not in WARMUP_SHAPES:
        raise ValueError(f"lr_scheduler.warmup_shape must be one of {WARMUP_SHAPES}, got {cfg.warmup_shape!r}")
    if cfg.decay not in DECAYS:
        raise ValueError(f"lr_scheduler.decay must be one of {DECAYS}, got {cfg.decay!r}")
    if not 0 <= cfg.warmup_steps <= total_steps:
        raise ValueError(f"lr_scheduler.warmup_steps must be in [0, training.steps={total_steps}], "
                         f"got {cfg.warmup_steps}")
    if not 0 <= cfg.min_lr <= peak_lr:
        raise ValueError(f"lr_scheduler.min_lr must be in [0, optimizer.lr={peak_lr}], got {cfg.min_lr}")
    if not 0 < cfg.wsd_decay_fraction <= 1:
        raise ValueError(f"lr_scheduler.wsd_decay_fraction must be in (0, 1], got {cfg.wsd_decay_fraction}")


class LRScheduler:
    """Sets every param group's lr to `lr_at(step)`; its state is the number of steps taken."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: LRSchedulerSection, *,
                 peak_lr: float, total_steps: int):
        validate_lr_scheduler(cfg, peak_lr=peak_lr, total_steps=total_steps)
        self.optimizer, self.cfg = optimizer, cfg
        self.peak_lr, self.total_steps = peak_lr, total_steps
        self.step_count = 0
        self._apply()

    def current_lr(self) -> float:
        return lr_at(self.step_count, peak_lr=self.peak_lr, total_steps=self.total_steps, cfg=self.cfg)

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"step": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        """Restore the position, and set the optimizer's lr to it (a loaded optimizer state
        carries the lr of the run it came from)."""
        self.step_count = int(state["step"])
        self._apply()

    def _apply(self) -> None:
        lr = self.current_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: LRSchedulerSection, *,
                       peak_lr: float, total_steps: int) -> LRScheduler:
    return LRScheduler(optimizer, cfg, peak_lr=peak_lr, total_steps=total_steps)
