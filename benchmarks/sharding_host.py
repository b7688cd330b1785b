"""Host time of each `parallelism.sharding` against the step it drives, on one rank:

    python benchmarks/sharding_host.py                                     # CPU, gloo: tiny, 32 blocks
    python benchmarks/sharding_host.py --preset bamba-9b --blocks 4 --seq-len 4096 --batch 2   # one GPU

Per sharding (fsdp2 and per-param, alternating, `--rounds` times): the host's milliseconds to
issue one forward+backward (the calls returning, nothing waited for) and the milliseconds per
step once the device has finished them. On CPU the two are the same and the tiny model's own work
is small, so what the sharding's hooks and collectives cost shows. On a GPU the host must issue a
step faster than the GPU runs it to keep it busy; bf16 parameters as under
optimizer.master_weights, eager."""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

from fms_bamba.config import ParallelismSection
from fms_bamba.model import Bamba, BambaConfig
from fms_bamba.parallel import apply_parallelism, build_mesh, init_distributed


def time_steps(sharding: str, args: argparse.Namespace, device: torch.device, warmup: int = 3) -> tuple[float, float]:
    """(host ms to issue a step, ms per step) over args.steps steps after `warmup`."""
    cfg = ParallelismSection(sharding=sharding)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    attention = tuple(i for i in BambaConfig.from_preset(args.preset).attn_layer_indices if i < args.blocks)
    with torch.device("meta"):
        model = Bamba(BambaConfig.from_preset(args.preset, n_layers=args.blocks, attn_layer_indices=attention)).to(dtype)
    apply_parallelism(model, build_mesh(cfg, device), cfg, param_dtype=dtype)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights()
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len), device=device)
    issue = 0.0
    for step in range(warmup + args.steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        issued = time.perf_counter()
        model(ids, labels=ids).backward()
        for param in model.parameters():
            param.grad = None
        if step >= warmup:
            issue += time.perf_counter() - issued
    if device.type == "cuda":
        torch.cuda.synchronize()
    return issue / args.steps * 1e3, (time.perf_counter() - start) / args.steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--blocks", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    init_distributed(device)
    try:
        for _ in range(args.rounds):
            for sharding in ("fsdp2", "per-param"):
                issue_ms, step_ms = time_steps(sharding, args, device)
                print(f"{sharding:<10} host issues a step in {issue_ms:7.1f} ms; {step_ms:7.1f} ms per step")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
