"""What a checkpoint costs the training loop: a synchronous save, asynchronous ones (written by a
thread, `async`, or by DCP's checkpoint process, `async_process`), and how long an asynchronous one
blocks training, for the model of a job config.

    torchrun --nproc_per_node=8 benchmarks/checkpoint.py configs/bamba-1b.yaml --out=/local/ckpt-bench
    python benchmarks/checkpoint.py configs/tiny.yaml --training.seq_len=64      # CPU, one process
    python benchmarks/checkpoint.py configs/tiny.yaml --modes=async,async_process  # the two writers

Trains on random tokens (no corpus needed) with the trainer's own model, parallelism, optimizer
and schedule; `--section.field=value` overrides the config as for `fms-bamba train`. Rank 0 prints
a table and one JSON line. `--out` should be on the file system real runs write to.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import fire
import torch
import torch.distributed as dist

from fms_bamba.checkpoint import CheckpointConfig, CheckpointManager, latest_complete_checkpoint, read_meta
from fms_bamba.config import load_job_config
from fms_bamba.optim import build_lr_scheduler, build_optimizer
from fms_bamba.parallel import build_mesh, dist_info_from_env, init_distributed
from fms_bamba.train import TrainerState, build_model, build_model_config, pick_device


class RandomTokens:
    """Uniform random batches; the position (batches drawn) is all its checkpoint state holds."""

    def __init__(self, vocab_size: int, micro_batch_size: int, seq_len: int, device: torch.device):
        self.shape, self.vocab_size, self.device = (micro_batch_size, seq_len + 1), vocab_size, device
        self.batches = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.batches += 1
        window = torch.randint(self.vocab_size, self.shape, device=self.device)
        return window[:, :-1], window[:, 1:]

    def state_dict(self) -> dict:
        return {"batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.batches = state["batches"]


MODES = {"sync": "disabled", "async": "async", "async_process": "async_process"}
"""Benchmark mode -> checkpoint.async_mode."""


def parse_modes(modes: str | tuple | list) -> list[str]:
    """`--modes=sync,async_process` (fire hands over a tuple when the names parse as Python, a
    string when one is the keyword `async`)."""
    names = [m.strip() for m in (modes.split(",") if isinstance(modes, str) else modes) if m.strip()]
    unknown = [m for m in names if m not in MODES]
    if unknown or not names:
        raise ValueError(f"--modes: {unknown or 'none given'}; choose from {','.join(MODES)}")
    return names


def main(config: str = "configs/bamba-1b.yaml", out: str = "/tmp/fms-bamba-checkpoint-bench",
         repeats: int = 2, modes: str = "sync,async", discard: bool = False, prepare: bool = True,
         **overrides) -> None:
    """modes: comma-separated saves to time, of sync, async (written by a thread) and async_process
    (written by DCP's checkpoint process); discard: delete each checkpoint once timed (a disk with
    room for one only, e.g. Bamba-9B's 117 GB); prepare: allocate the async modes' host buffers
    before the warm-up steps, as the trainer does (False: at the first save, as before)."""
    modes = parse_modes(modes)
    cfg = load_job_config(config, overrides)
    info = dist_info_from_env()
    model_cfg, device = build_model_config(cfg), pick_device(cfg, info)
    init_distributed(device, cfg.parallelism)
    rank0 = info.rank == 0
    out_dir = Path(out)
    if rank0 and out_dir.exists():
        shutil.rmtree(out_dir)

    model, weights = build_model(model_cfg, build_mesh(cfg.parallelism, device), cfg, device)
    optimizer = build_optimizer(model, cfg.optimizer, weights=weights)
    lr_scheduler = build_lr_scheduler(optimizer, cfg.lr_scheduler, peak_lr=cfg.optimizer.lr,
                                      total_steps=cfg.training.steps)
    data = RandomTokens(model_cfg.vocab_size, cfg.training.micro_batch_size, cfg.training.seq_len, device)
    state = TrainerState()

    def train_step() -> float:
        """One optimizer step; returns its wall time (the device included)."""
        start = time.perf_counter()
        input_ids, labels = data.next()
        model(input_ids, labels=labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr_scheduler.step()
        state.step += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def manager(async_mode: str, run_dir: Path) -> CheckpointManager:
        return CheckpointManager(CheckpointConfig(interval=1, keep_last=1, async_mode=async_mode), run_dir,
                                 model=weights, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                 data_loader=data, trainer_state=state)

    def timed(fn) -> float:
        dist.barrier()
        start = time.perf_counter()
        fn()
        dist.barrier()
        return time.perf_counter() - start

    def any_rank(flag: bool) -> bool:
        agreed = torch.tensor([int(flag)], device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        return bool(agreed.item())

    async_modes = [m for m in modes if m != "sync"]
    async_ckpts = {mode: manager(MODES[mode], out_dir / mode) for mode in async_modes}
    prepare_start = time.perf_counter()
    allocations = [async_ckpt.prepare_staging() for async_ckpt in async_ckpts.values()] if prepare else []
    warmup_s = [train_step() for _ in range(2)]  # the first compiles, when compiling
    for allocation in allocations:
        allocation.result()
    prepared_s = time.perf_counter() - prepare_start
    step_time = min(train_step() for _ in range(3))

    def discard_checkpoints(folder: Path) -> float:
        """Size in GB of the newest checkpoint under folder; with `discard`, delete them all."""
        size_gb = sum(read_meta(latest_complete_checkpoint(folder))["files"].values()) / 1e9
        dist.barrier()
        if discard and rank0:
            shutil.rmtree(folder)
        dist.barrier()
        return size_gb

    sync_times, size_gb = [], 0.0
    if "sync" in modes:
        sync = manager("disabled", out_dir / "sync")
        for _ in range(repeats):
            sync_times.append(timed(lambda: sync.save(state.step)))
            size_gb = discard_checkpoints(out_dir / "sync")
            train_step()

    async_results = {}
    for mode, async_ckpt in async_ckpts.items():
        blocked, total, overlapped_steps = [], [], []
        for _ in range(repeats):
            start = time.perf_counter()
            blocked.append(timed(lambda: async_ckpt.save(state.step)))
            step_times = []
            while any_rank(async_ckpt.writing):  # train while the write runs, the same steps on all ranks
                step_times.append(train_step())
            async_ckpt.wait_for_write()
            dist.barrier()
            total.append(time.perf_counter() - start)
            overlapped_steps.append(step_times)
            size_gb = discard_checkpoints(out_dir / mode)
            train_step()
        async_ckpt.close()  # the host buffers (and async_process's daemon) served every repeat, as in a run
        async_results.update({  # the first repeat spawns async_process's daemon; allocates the buffers without prepare
            f"{mode}_blocked_s": [round(t, 3) for t in blocked],
            f"{mode}_write_s": [round(t, 3) for t in total],
            f"steps_during_{mode}_write": [len(times) for times in overlapped_steps],
            f"step_s_during_{mode}_write": [round(sum(times) / len(times), 4) if times else None
                                            for times in overlapped_steps],
            # Training time the save cost: the blocked start, and what the overlapped steps took
            # beyond the same number of steps without a save.
            f"{mode}_lost_s": [round(b + sum(times) - len(times) * step_time, 2)
                               for b, times in zip(blocked, overlapped_steps)],
        })

    result = {
        "config": config, "preset": cfg.model.preset, "world_size": info.world_size, "device": device.type,
        "parameters": sum(p.numel() for p in model.parameters()), "checkpoint_gb": round(size_gb, 3),
        "step_s": round(step_time, 4), "modes": modes, "prepare": prepare,
        "warmup_step_s": [round(t, 2) for t in warmup_s],
        # From prepare_staging (or the warm-up's start) until the buffers exist and both warm-up steps ran.
        "prepared_s": round(prepared_s, 2),
        "sync_save_s": [round(t, 3) for t in sync_times],
        "sync_gb_per_s": round(size_gb / min(sync_times), 3) if sync_times else None,
        **async_results,
    }
    if rank0:
        for key, value in result.items():
            print(f"{key:>34}: {value}")
        print(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    fire.Fire(main)
