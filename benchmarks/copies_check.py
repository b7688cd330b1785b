"""FSDP2's per-block copies on SM kernels against the GPU's copy engines, on one GPU, at the size
of one Bamba-9B Mamba-2 block sharded over --world ranks (default 2):

    python benchmarks/copies_check.py [--world 2] [--repeats 20]

Around each unit's collectives FSDP2 copies the parameter shards into the all-gather buffer
(beside the computation, on a stream of its own), the gathered rows out into each parameter and
the gradients' rows into the reduce-scatter buffer (both on the computation's stream), each with
a torch kernel on SMs. The same copies can be made as one `cudaMemcpyAsync` per contiguous piece
(`Tensor.copy_` of contiguous tensors), which the copy engines carry with no SM. For each way this
prints its time alone, the GPU work it launches (kernels or memcpys), and how much slower a bf16
8192^3 matmul runs beside it than alone. docs/performance.md (session 10) has the figures and why
the trainer keeps torch's kernels.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from all_gather_check import cuda_ms  # this folder's: event-timed mean over repeats
from fms_bamba.model import Bamba, BambaConfig


def block_shapes(preset: str) -> list[torch.Size]:
    """The parameter shapes of the preset's first block (a Mamba-2 block)."""
    with torch.device("meta"):
        model = Bamba(BambaConfig.from_preset(preset))
    return [p.shape for p in model.layers[0].parameters()]


def launched(fn) -> list[str]:
    """The distinct GPU activities (kernels and memcpys) one call of fn launches."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sorted({e.name[:60] for e in prof.events() if e.device_type.name == "CUDA"})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="bamba-9b")
    parser.add_argument("--world", type=int, default=2, help="ranks the block is sharded over")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device, dtype, world = torch.device("cuda"), torch.bfloat16, args.world
    numels = [s.numel() for s in block_shapes(args.preset)]
    shard_numels = [-(-n // world) for n in numels]  # FSDP pads dim 0; the numel is what matters here

    # All-gather copy-in: each parameter's shard into its place in this rank's part of the buffer.
    shards = [torch.randn(n, device=device, dtype=dtype) for n in shard_numels]
    gathered = torch.empty(world, sum(shard_numels), device=device, dtype=dtype)
    copy_in_args = (shards, gathered.view(-1), shard_numels, sum(shard_numels), 0)
    # All-gather copy-out: the gathered [world, shard numel] buffer into each parameter's [world, n].
    params = [torch.empty(world, n, device=device, dtype=dtype) for n in shard_numels]
    # Reduce-scatter copy-in: row r of every full gradient side by side in row r of the buffer.
    grads = [torch.randn(n * world, device=device, dtype=dtype) for n in shard_numels]
    scatter_in = torch.empty(world, sum(shard_numels), device=device, dtype=dtype)
    mine = gathered[0]  # rank 0's part of the all-gather buffer

    def copy_in_pieces() -> None:
        for dst, src in zip(torch.split(mine, shard_numels), shards):
            dst.copy_(src)

    def copy_out_pieces() -> None:
        for src, dst in zip(torch.split(gathered, shard_numels, dim=1), params):
            for row in range(world):
                dst[row].copy_(src[row])

    def scatter_in_pieces() -> None:
        start = 0
        for grad in grads:
            rows = grad.view(world, -1)
            for row in range(world):
                scatter_in[row, start:start + rows.size(1)].copy_(rows[row])
            start += rows.size(1)

    # name: (torch's kernel as FSDP2 calls it, a memcpy per contiguous piece, what both write, bytes moved)
    copied = 2 * sum(shard_numels) * 2  # one shard of each parameter read and written, bf16
    ways = {
        "gather copy-in": (lambda: torch.ops.fsdp.all_gather_copy_in(*copy_in_args), copy_in_pieces,
                           [gathered], copied),
        "gather copy-out": (lambda: torch.split_with_sizes_copy(gathered, shard_numels, dim=1, out=params),
                            copy_out_pieces, params, copied * world),
        "scatter copy-in": (lambda: torch._chunk_cat(grads, 0, world, out=scatter_in), scatter_in_pieces,
                            [scatter_in], copied * world),
    }
    for name, (kernel, pieces, outputs, _) in ways.items():  # both ways must write the same bytes
        results = []
        for fn in (kernel, pieces):
            for t in outputs:
                t.zero_()
            fn()
            results.append([t.clone() for t in outputs])
        expected, got = results
        assert all(torch.equal(t, e) for t, e in zip(got, expected)), f"{name}: copies differ"

    a = torch.randn(8192, 8192, device=device, dtype=dtype)
    matmul_ms = cuda_ms(lambda: a @ a, args.repeats)
    side = torch.cuda.Stream()
    print(f"{args.preset} block 0, {len(numels)} parameters, {sum(numels) / 1e6:.0f} M elements, world {world}; "
          f"matmul alone {matmul_ms:.3f} ms", flush=True)
    for name, (kernel, pieces, _, moved) in ways.items():
        for how, fn in (("torch's kernel", kernel), ("copy engines", pieces)):
            alone = cuda_ms(fn, args.repeats, side)
            torch.cuda.synchronize()
            with torch.cuda.stream(side):  # copies queued on a side stream for as long as the matmuls run
                for _ in range(args.repeats * (1 + round(matmul_ms / alone))):
                    fn()
            beside = cuda_ms(lambda: a @ a, args.repeats)
            torch.cuda.synchronize()
            kinds = launched(fn)
            print(f"{name:16s} {how:15s} {alone:6.3f} ms ({moved / alone / 1e6:5.0f} GB/s), matmul beside it "
                  f"{beside:6.3f} ms (+{(beside / matmul_ms - 1) * 100:4.1f}%), launches: {kinds[:3]}", flush=True)


if __name__ == "__main__":
    main()
