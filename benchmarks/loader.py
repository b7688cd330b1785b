"""Throughput of one loader process: mixing + packing into 4096+1 windows + shuffling.

    python benchmarks/loader.py [--data DIR] [--workers 0] [--seconds 20]

Without --data, a synthetic corpus is generated once (and cached in --cache): 3 datasets weighted
5:3:2, ~200M uint32 tokens in Arrow IPC shards with counts.csv, document lengths log-normal
around a mean of ~1,000 tokens, clipped to 16..20,000. Prints the time to the first batch, steady
tokens/s after warm-up and the peak RSS; the last line is `tokens/s: N`.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from data_loader import DataConfig, build_dataloader
from data_loader.shards import write_counts_file

VOCAB_SIZE = 128_256
DATASETS = {"web": 100_000_000, "code": 60_000_000, "papers": 40_000_000}  # tokens, weighted 5:3:2
TOKENS_PER_SHARD = 5_000_000


def write_dataset(directory: Path, tokens: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    schema = pa.schema([("tokens", pa.uint32())])
    counts = {}
    for shard_number in range(-(-tokens // TOKENS_PER_SHARD)):
        lengths = np.clip(rng.lognormal(np.log(600), 1.0, TOKENS_PER_SHARD // 500), 16, 20_000).astype(np.int64)
        lengths = lengths[: np.searchsorted(np.cumsum(lengths), TOKENS_PER_SHARD) + 1]
        ends = np.cumsum(lengths)
        stream = rng.integers(0, VOCAB_SIZE, ends[-1], dtype=np.uint32)
        name = f"shard-{shard_number:04d}.arrow"
        with pa.OSFile(str(directory / f"{name}.tmp"), "wb") as sink, ipc.new_file(sink, schema) as writer:
            for start, end in zip(ends - lengths, ends):
                writer.write_batch(pa.record_batch([pa.array(stream[start:end])], schema=schema))
        (directory / f"{name}.tmp").rename(directory / name)
        counts[name] = (len(lengths), int(ends[-1]))
    write_counts_file(directory, counts)


def ensure_corpus(cache: Path) -> Path:
    done = cache / "COMPLETE"
    if not done.exists():
        print(f"generating the synthetic corpus in {cache} (once)", flush=True)
        for seed, (name, tokens) in enumerate(DATASETS.items()):
            (cache / name).mkdir(parents=True, exist_ok=True)
            write_dataset(cache / name, tokens, seed)
        done.touch()
    return cache


def peak_rss_gib() -> tuple[float, float]:
    """Peak resident set of this process, and the largest of its live loader workers (VmHWM)."""
    workers = [0.0]
    for child in multiprocessing.active_children():
        with open(f"/proc/{child.pid}/status") as status:
            workers += [int(line.split()[1]) / 2**20 for line in status if line.startswith("VmHWM:")]
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, max(workers)


def cpu_seconds() -> tuple[float, float]:
    """CPU time of this process, and of its live loader workers (read from /proc: rusage counts only exited children)."""
    workers = 0.0
    for child in multiprocessing.active_children():
        with open(f"/proc/{child.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        workers += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return time.process_time(), workers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="root holding dataset directories (default: the synthetic corpus)")
    parser.add_argument("--datasets", nargs="+", help="datasets under --data (default: all its subdirectories)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/fms-bamba-loader-bench"))
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", type=int, default=0, help="dataloader workers (0 = measure this process)")
    parser.add_argument("--shuffle-buffer", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=20, help="batches before timing starts")
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()

    if args.data is None:
        # A child writes the corpus, so its memory does not count towards the loader's peak RSS.
        child = multiprocessing.get_context("fork").Process(target=ensure_corpus, args=(args.cache,))
        child.start()
        child.join()
        root, datasets, weights = args.cache, list(DATASETS), [5.0, 3.0, 2.0]
    else:
        root = args.data
        datasets = args.datasets or sorted(p.name for p in root.iterdir() if p.is_dir())
        weights = []
    cfg = DataConfig(root=str(root), datasets=datasets, weights=weights, num_workers=args.workers, shuffle_buffer=args.shuffle_buffer, seed=1234)

    started = time.perf_counter()
    loader = build_dataloader(cfg, rank=0, world_size=1, seq_len=args.seq_len, micro_batch_size=args.batch, vocab_size=VOCAB_SIZE)
    batches = iter(loader)
    next(batches)
    first_batch_s = time.perf_counter() - started
    for _ in range(args.warmup):
        next(batches)
    tokens, started, (main_cpu, workers_cpu) = 0, time.perf_counter(), cpu_seconds()
    while time.perf_counter() - started < args.seconds:
        tokens += next(batches)["input_ids"].numel()
    tokens_per_s = tokens / (time.perf_counter() - started)
    main_cpu, workers_cpu = (now - before for now, before in zip(cpu_seconds(), (main_cpu, workers_cpu)))

    print(f"datasets: {', '.join(f'{d} ({w:g})' for d, w in zip(datasets, cfg.normalized_weights()))}")
    print(f"seq_len {args.seq_len}, micro-batch {args.batch}, workers {args.workers}, shuffle buffer {args.shuffle_buffer}")
    print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"first batch: {first_batch_s:.2f} s")
    main_rss, worker_rss = peak_rss_gib()
    print(f"peak RSS: {main_rss:.2f} GiB" + (f", each worker at most {worker_rss:.2f} GiB" if args.workers else ""))
    print(f"CPU seconds per second: {main_cpu / args.seconds:.2f} in this process, {workers_cpu / args.seconds:.2f} in workers")
    if args.workers:
        print(f"tokens per worker CPU-second: {tokens / workers_cpu:.0f}")
    print(f"tokens per CPU-second, all processes: {tokens / (main_cpu + workers_cpu):.0f}")
    print(f"tokens/s: {tokens_per_s:.0f}")


if __name__ == "__main__":
    main()
