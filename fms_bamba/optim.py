"""AdamW over the model's parameter groups, and the learning-rate schedules."""

from __future__ import annotations

import math

import torch

from fms_bamba.config import LRSchedulerSection, OptimizerSection
from fms_bamba.model import optimizer_param_groups

WARMUP_SHAPES = ("linear", "quadratic")
DECAYS = ("cosine", "linear", "constant", "wsd")


def build_optimizer(model: torch.nn.Module, cfg: OptimizerSection) -> torch.optim.AdamW:
    """Fused AdamW (CPU and CUDA) with weight decay only where `optimizer_param_groups` puts it.

    Fused, because its step honours `optimizer.found_inf`: the trainer skips a non-finite step
    on the device, without waiting for it."""
    groups = optimizer_param_groups(model, cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, fused=True)


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
