"""Each `parallelism.sharding` on one rank: the host's time to issue a step, the time per step and
the step's peak memory.

    python benchmarks/sharding_compare.py                                   # CPU, gloo: tiny, 32 blocks
    python benchmarks/sharding_compare.py --preset bamba-9b --blocks 10 --seq-len 4096 --batch 2   # one GPU

Per sharding (fsdp2 and per-param, alternating, `--rounds` times): the host's milliseconds to
issue one forward+backward (the calls returning, nothing waited for), the milliseconds per step
once the device has finished them, and the peak of the memory allocated during one more step above
what was allocated before it (CUDA: `max_memory_allocated`; CPU: the profiler's memory events).
On CPU the first two are the same and the tiny model's own work is small, so what the sharding's
hooks and collectives cost the host shows. On a GPU the host must issue a step faster than the
GPU runs it to keep it busy. Parameters in `--param-dtype` (float32 by default on CPU, as without
master weights; bfloat16 on GPU, as with them), computation in bf16 on GPU and in `--compute-dtype`
on CPU; `--activation-checkpoint` and `--reshard-after-forward` as in the job config; eager."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from fms_bamba.config import ParallelismSection
from fms_bamba.model import Bamba, BambaConfig
from fms_bamba.parallel import DTYPES, apply_parallelism, build_mesh, init_distributed


def build(sharding: str, args: argparse.Namespace, device: torch.device) -> Bamba:
    cfg = ParallelismSection(sharding=sharding, activation_checkpoint=args.activation_checkpoint,
                             reshard_after_forward=args.reshard_after_forward)
    attention = tuple(i for i in BambaConfig.from_preset(args.preset).attn_layer_indices if i < args.blocks)
    with torch.device("meta"):
        model = Bamba(BambaConfig.from_preset(args.preset, n_layers=args.blocks, attn_layer_indices=attention))
    model.to(DTYPES[args.param_dtype])
    apply_parallelism(model, build_mesh(cfg, device), cfg, param_dtype=DTYPES[args.compute_dtype])
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights()
    return model


def step(model: Bamba, ids: torch.Tensor) -> None:
    model(ids, labels=ids).backward()
    for param in model.parameters():
        param.grad = None


def peak_mib(model: Bamba, ids: torch.Tensor, device: torch.device) -> float:
    """MiB allocated at the peak of one step, above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(model, ids)
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    with torch.profiler.profile(profile_memory=True) as prof:
        step(model, ids)
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(str(Path(tmp) / "trace.json"))
        events = [e for e in json.loads((Path(tmp) / "trace.json").read_text())["traceEvents"]
                  if e.get("name") == "[memory]"]
    before = events[0]["args"]["Total Allocated"] - events[0]["args"]["Bytes"]
    return (max(e["args"]["Total Allocated"] for e in events) - before) / 2**20


def measure(sharding: str, args: argparse.Namespace, device: torch.device, warmup: int = 3) -> str:
    model = build(sharding, args, device)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len), device=device)
    issue = 0.0
    for index in range(warmup + args.steps):
        if index == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        issued = time.perf_counter()
        step(model, ids)
        if index >= warmup:
            issue += time.perf_counter() - issued
    if device.type == "cuda":
        torch.cuda.synchronize()
    step_ms = (time.perf_counter() - start) / args.steps * 1e3
    return (f"{sharding:<10} host issues a step in {issue / args.steps * 1e3:7.1f} ms; {step_ms:7.1f} ms per step; "
            f"peak {peak_mib(model, ids, device):9.1f} MiB above the step's start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--blocks", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--param-dtype", choices=tuple(DTYPES), default=None)
    parser.add_argument("--compute-dtype", choices=tuple(DTYPES), default=None)
    parser.add_argument("--activation-checkpoint", default="none")
    parser.add_argument("--reshard-after-forward", default="default")
    args = parser.parse_args()
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    cuda = device.type == "cuda"
    args.param_dtype = args.param_dtype or ("bfloat16" if cuda else "float32")
    args.compute_dtype = "bfloat16" if cuda else (args.compute_dtype or args.param_dtype)
    if not cuda:
        torch.set_num_threads(1)
    init_distributed(device)
    try:
        for _ in range(args.rounds):
            for sharding in ("fsdp2", "per-param"):
                print(measure(sharding, args, device))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
