"""AdamW over the model's parameter groups, and the learning-rate schedules."""

from __future__ import annotations

import functools
import math

import torch

from fms_bamba.config import LRSchedulerSection, OptimizerSection
from fms_bamba.model import optimizer_param_groups
from fms_bamba.staging import local_shard

WARMUP_SHAPES = ("linear", "quadratic")
DECAYS = ("cosine", "linear", "constant", "wsd")


def build_optimizer(model: torch.nn.Module, cfg: OptimizerSection) -> torch.optim.AdamW:
    """Fused AdamW (CPU and CUDA) with weight decay only where `optimizer_param_groups` puts it.

    Fused, because its step honours `optimizer.found_inf`: the trainer skips a non-finite step
    on the device, without waiting for it."""
    groups = optimizer_param_groups(model, cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, fused=True)


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
    block before its next forward must synchronize first (a checkpoint's copy does)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer
        blocks = list(model.layers)
        in_blocks = {p for block in blocks for p in block.parameters()}
        units = [{p for p in model.parameters() if p not in in_blocks}] + [set(b.parameters()) for b in blocks]
        # Per unit, its parameters in each param group (in the group's order; a group may be empty).
        self.unit_groups = [[[p for p in group["params"] if p in unit] for group in optimizer.param_groups]
                            for unit in units]
        self.params = [p for groups in self.unit_groups for params in groups for p in params]
        self.stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        self.block_events: list[torch.cuda.Event | None] = [None] * len(blocks)
        if self.stream is not None:
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
                if index == 0:  # the root's all-gather (embedding, final norm, LM head) waits for it
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
