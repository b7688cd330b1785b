"""Trainer throughput on synthetic tokens: tokens/s per GPU, MFU, step time and peak memory.

    python benchmarks/train.py --preset bamba-1b                       # one GPU
    torchrun --nproc_per_node=8 benchmarks/train.py --preset bamba-9b --activation-checkpoint full
    python benchmarks/train.py --preset tiny --seq-len 256 --micro-batch-size 8 --steps 20   # CPU

Runs the real trainer (`fms_bamba.train.train`) with checkpointing off on a corpus of random
token ids (written once as a Parquet shard under --workdir), logs every --log-interval steps and
averages the records after the first (which holds start-up and compilation), printing their range
beside the mean. Extra job-config overrides go after --set, e.g.
`--set parallelism.compile=true training.dtype=float32`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from fms_bamba.config import load_job_config
from fms_bamba.model import BambaConfig
from fms_bamba.profiling import profiled_steps
from fms_bamba.train import train

SHARD_NAME = "shard-0000.parquet"


def write_synthetic_dataset(directory: Path, vocab_size: int, learnable: bool = False, documents: int = 512,
                            seed: int = 0) -> Path:
    """One Parquet shard of ~1M tokens of random documents (the loader cycles it in new orders).
    Uniform random tokens, or with `learnable` a first-order Markov chain over 2,048 of the ids
    (each token picks its successor from 4 fixed ones) whose loss falls far in a few dozen steps."""
    shard = directory / f"{'markov' if learnable else 'random'}-{vocab_size}" / SHARD_NAME
    if shard.exists():
        return shard.parent
    shard.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lengths = rng.integers(256, 3840, documents)
    if learnable:
        ids = rng.choice(vocab_size, 2048, replace=False).astype(np.uint32)
        successors = rng.integers(0, len(ids), (len(ids), 4))
        tokens = []
        for length in lengths:
            walk = np.empty(length, dtype=np.int64)
            walk[0] = rng.integers(len(ids))
            choices = rng.integers(0, 4, length)
            for t in range(1, length):
                walk[t] = successors[walk[t - 1], choices[t]]
            tokens.append(ids[walk])
    else:
        tokens = [rng.integers(0, vocab_size, length, dtype=np.uint32) for length in lengths]
    tmp = shard.with_name(f"{shard.name}.tmp-{os.getpid()}")
    pq.write_table(pa.table({"tokens": pa.array(tokens, type=pa.list_(pa.uint32()))}), tmp)
    tmp.rename(shard)
    return shard.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bamba-1b")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--log-interval", type=int, default=5)
    parser.add_argument("--activation-checkpoint", default="none")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--workdir", default="/tmp/fms-bamba-bench")
    parser.add_argument("--learnable-data", action="store_true",
                        help="a Markov-chain corpus whose loss falls (for comparing loss curves), not uniform tokens")
    parser.add_argument("--run-name", default="run", help="run directory under --workdir")
    parser.add_argument("--set", nargs="*", default=[], metavar="SECTION.FIELD=VALUE")
    args = parser.parse_args()

    workdir = Path(args.workdir)
    rank = int(os.environ.get("RANK", 0))
    vocab_size = BambaConfig.from_preset(args.preset).vocab_size
    if rank == 0:
        dataset = write_synthetic_dataset(workdir, vocab_size, args.learnable_data)
    else:  # other ranks wait for rank 0's rename; no process group exists yet
        dataset = workdir / f"{'markov' if args.learnable_data else 'random'}-{vocab_size}"
        while not (dataset / SHARD_NAME).exists():
            time.sleep(0.5)
    overrides = [
        f"job.run_dir={workdir / args.run_name}", f"model.preset={args.preset}",
        f"data.root={workdir}", f"data.datasets=[{dataset.name}]", "data.num_workers=2",
        f"training.seq_len={args.seq_len}", f"training.micro_batch_size={args.micro_batch_size}",
        f"training.steps={args.steps}", f"lr_scheduler.warmup_steps={min(5, args.steps)}",
        "optimizer.lr=3e-4", "lr_scheduler.min_lr=3e-5",
        f"parallelism.activation_checkpoint={args.activation_checkpoint}", f"parallelism.compile={args.compile}",
        "checkpoint.enable=false", f"metrics.log_interval={args.log_interval}", "metrics.progress_bar=false",
        *args.set,
    ]
    cfg = load_job_config(None, overrides)
    metrics = Path(cfg.job.run_dir) / "metrics.jsonl"
    if rank == 0 and metrics.exists():
        metrics.unlink()  # a fresh run each time: no resume, no stale records
    train(cfg)
    if rank != 0:
        return

    logged = [json.loads(line) for line in metrics.read_text().splitlines()]
    # The first interval holds start-up and compilation; profiled ones run slower.
    starts = [0] + [r["step"] for r in logged]  # each record covers steps starts[i] + 1 .. its step
    profiled = profiled_steps(cfg.profiling)
    records = [r for i, r in enumerate(logged) if i > 0 and not any(starts[i] < s <= r["step"] for s in profiled)]
    if not records:
        raise SystemExit(f"no steady-state records: raise --steps above {args.log_interval}")
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    interval_rates = [r["tokens_per_sec_per_gpu"] for r in records]
    tokens_per_sec_per_gpu = float(np.mean(interval_rates))
    tokens_per_step = records[-1]["tokens_seen"] // records[-1]["step"]
    mfu = [r["mfu"] for r in records if r["mfu"] is not None]
    print(f"preset {args.preset}, {world_size} device(s), seq {args.seq_len} x micro-batch {args.micro_batch_size}, "
          f"{tokens_per_step:,} tokens per step, activation checkpointing {args.activation_checkpoint}, "
          f"compile {args.compile}")
    print(f"step time: {tokens_per_step / (tokens_per_sec_per_gpu * world_size):.3f} s")
    # The intervals' range shows how far a rerun can move the mean: an A/B closer than that is noise.
    print(f"tokens/s/GPU: {tokens_per_sec_per_gpu:,.0f} (intervals {min(interval_rates):,.0f} to "
          f"{max(interval_rates):,.0f}, {len(interval_rates)} of {args.log_interval} steps)")
    print(f"MFU: {float(np.mean(mfu)):.1%}" if mfu else "MFU: unknown device peak (set --set metrics.peak_tflops=N)")
    print(f"peak memory: {max(r['mem_gib'] for r in records):.2f} GiB")
    if torch.cuda.is_available():
        stats = torch.cuda.memory_stats()
        print(f"allocator: {stats['num_alloc_retries']} retries (cache flushes), "
              f"{stats['reserved_bytes.all.peak'] / 2**30:.2f} GiB peak reserved")


if __name__ == "__main__":
    main()
