"""Training metrics on rank 0: a tqdm bar and log lines, RUN_DIR/metrics.jsonl, Weights & Biases."""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fms_bamba.config import MetricsSection

# Dense bf16 peak per GPU, matched against torch.cuda.get_device_name().
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12}
# A CPU has no agreed peak; MFU on CPU is relative to this unless metrics.peak_tflops says otherwise.
CPU_PEAK_FLOPS = 1e12


def device_peak_flops(device: torch.device, peak_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one device for MFU; None for an unknown GPU without an override."""
    if peak_tflops > 0:
        return peak_tflops * 1e12
    if device.type != "cuda":
        return CPU_PEAK_FLOPS
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in GPU_PEAK_FLOPS.items() if key in name), None)


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: allocated GPU memory, or the resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _json_value(value: Any) -> Any:
    """JSON has no NaN/inf: a skipped step's non-finite loss is written as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricsLogger:
    """Rank 0 writes each record to the console, metrics.jsonl and W&B; other ranks' calls do nothing."""

    def __init__(self, cfg: MetricsSection, run_dir: Path, *, rank: int, total_steps: int,
                 start_step: int, wandb_run_id: str, run_name: str, config: dict):
        self.enabled = rank == 0
        self.wandb_run = None
        self.bar = None
        if not self.enabled:
            return
        self.jsonl = open(Path(run_dir) / "metrics.jsonl", "a", buffering=1)
        if cfg.progress_bar and sys.stderr.isatty():
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        if cfg.wandb:
            import wandb

            self.wandb_run = wandb.init(
                project=cfg.wandb_project, entity=cfg.wandb_entity or None, mode=cfg.wandb_mode,
                id=wandb_run_id, resume="allow", name=run_name or None, dir=str(run_dir), config=config)

    def advance(self) -> None:
        """One optimizer step done."""
        if self.bar is not None:
            self.bar.update(1)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {key: _json_value(value) for key, value in record.items()}
        self.jsonl.write(json.dumps(record) + "\n")
        line = format_record(record)
        if self.bar is not None:
            self.bar.set_postfix(loss=record["loss"])
            self.bar.write(line)
        else:
            print(line, flush=True)
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self.jsonl.close()
        if self.bar is not None:
            self.bar.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def format_record(record: dict[str, Any]) -> str:
    def number(key: str, spec: str) -> str:
        value = record.get(key)
        return "n/a" if value is None else format(value, spec)

    return (f"step {record['step']} | loss {number('loss', '.4f')} | lr {number('lr', '.2e')} | "
            f"grad_norm {number('grad_norm', '.3f')} | tokens/s/gpu {number('tokens_per_sec_per_gpu', ',.0f')} | "
            f"mfu {number('mfu', '.2%')} | mem {number('mem_gib', '.2f')} GiB | "
            f"skipped {record.get('skipped_steps', 0)}")
