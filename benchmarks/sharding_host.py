"""Host time of each `parallelism.sharding`: forward+backward of the tiny preset deepened to
Bamba-9B's 32 blocks, on one CPU rank (gloo), where the model's own work is small and what the
sharding's hooks and collectives cost the host shows:

    python benchmarks/sharding_host.py [--blocks 32] [--steps 10] [--rounds 2]

Prints milliseconds per step for fsdp2 and per-param, alternating, `--rounds` times each."""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

from fms_bamba.config import ParallelismSection
from fms_bamba.model import Bamba, BambaConfig
from fms_bamba.parallel import apply_parallelism, build_mesh


def ms_per_step(sharding: str, blocks: int, steps: int, warmup: int = 3) -> float:
    cfg = ParallelismSection(sharding=sharding)
    with torch.device("meta"):
        model = Bamba(BambaConfig.from_preset("tiny", mamba_chunk_size=8, n_layers=blocks))
    apply_parallelism(model, build_mesh(cfg, torch.device("cpu")), cfg)
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights()
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        model(ids, labels=ids).backward()
        for param in model.parameters():
            param.grad = None
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for _ in range(args.rounds):
            for sharding in ("fsdp2", "per-param"):
                print(f"{sharding:<10} {ms_per_step(sharding, args.blocks, args.steps):7.1f} ms per forward+backward")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
