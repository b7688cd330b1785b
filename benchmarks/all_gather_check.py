"""FSDP2's all-gather on NCCL's kernels against its copy-engine one (`parallelism.all_gather`), at
the size of one Bamba-9B block's gather, on 2+ GPUs of one node:

    torchrun --standalone --nproc_per_node=2 benchmarks/all_gather_check.py --all-gather nccl|copy-engine

Checks the gathered tensor against the shards, then times the all-gather alone, a bf16 matmul
alone, and the two together (the all-gather on a side stream, as FSDP runs it): what the matmul
loses beside the gather is what the copy engines are meant to win back. Also lists the NCCL kernels
one gather launches (the copy-engine path should launch none).

With --all-gather copy-engine it stopped at its first all-gather on the H200 host (NCCL 2.28.9:
"unhandled cuda error", invalid argument), while the trainer runs with it; see docs/performance.md."""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from fms_bamba.config import ParallelismSection
from fms_bamba.parallel import CopyEngineAllGather, build_mesh, copy_engine_group, init_distributed


def cuda_ms(fn, repeats: int, stream: torch.cuda.Stream | None = None) -> float:
    """Mean milliseconds of fn() over `repeats` calls, timed with events on `stream`."""
    stream = stream or torch.cuda.current_stream()
    with torch.cuda.stream(stream):
        fn()  # warm-up (registration, autotuning)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        for _ in range(repeats):
            fn()
        end.record(stream)
    end.synchronize()
    return start.elapsed_time(end) / repeats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--all-gather", choices=("nccl", "copy-engine"), default="nccl")
    parser.add_argument("--numel", type=int, default=280_000_000, help="gathered elements (bf16)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    cfg = ParallelismSection(all_gather=args.all_gather)
    init_distributed(device, cfg)  # as the trainer starts it
    group = dist.group.WORLD
    copy_engine = (CopyEngineAllGather(copy_engine_group(build_mesh(cfg, device)))
                   if args.all_gather == "copy-engine" else None)
    gather = copy_engine or (lambda output, input, group: dist.all_gather_into_tensor(output, input, group=group))

    shard = args.numel // world
    size, dtype = (shard * world,), torch.bfloat16
    out = copy_engine.allocate(size, dtype=dtype, device=device) if copy_engine else torch.empty(size, dtype=dtype, device=device)
    mine = out.narrow(0, rank * shard, shard)

    def rank_values(r: int) -> torch.Tensor:
        return torch.arange(shard, device=device, dtype=torch.float32).mul_(1e-6).add_(r).bfloat16()

    mine.copy_(rank_values(rank))
    gather(out, mine, group)
    assert torch.equal(out, torch.cat([rank_values(r) for r in range(world)])), "gathered tensor differs from the shards"

    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    matmul_ms = cuda_ms(lambda: a @ a, args.repeats)
    side = torch.cuda.Stream()
    alone = cuda_ms(lambda: gather(out, mine, group), args.repeats, side)
    torch.cuda.synchronize()
    with torch.cuda.stream(side):  # the gathers queued on a side stream, the matmuls on the default one
        for _ in range(args.repeats):
            gather(out, mine, group)
    beside = cuda_ms(lambda: a @ a, args.repeats * max(1, round(alone / matmul_ms)))
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        gather(out, mine, group)
        torch.cuda.synchronize()
    nccl = sorted({e.name[:50] for e in prof.events() if "nccl" in e.name.lower() and e.device_type.name == "CUDA"})
    if rank == 0:
        gbps = shard * (world - 1) * 2 / alone / 1e6
        print(f"{args.all_gather:12s} all-gather {alone:6.2f} ms ({gbps:5.0f} GB/s received), matmul alone "
              f"{matmul_ms:5.2f} ms, beside the gathers {beside:5.2f} ms (+{(beside / matmul_ms - 1) * 100:4.1f}%), "
              f"NCCL kernels: {nccl or 'none'}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
