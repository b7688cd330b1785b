"""FSDP2's copies into and out of its collectives' buffers, made as one copy per contiguous
piece, which CUDA runs as a device-to-device memcpy on the GPU's copy engines, instead of
torch's copy kernels, which hold SMs (`parallelism.fsdp_copies=copy-engine`).

FSDP2 makes three copies around each unit's collectives: the parameter shards into the
all-gather buffer (`fsdp::all_gather_copy_in`), the gathered rows out into each parameter
(`fsdp::split_with_sizes_copy`), and the gradients' rows into the reduce-scatter buffer
(`fsdp::chunk_cat`). `use_copy_engines` registers kernels of ours for those three ops, which
FSDP2 calls through the dispatcher; anything our kernels do not cover (padded or
non-contiguous pieces) goes to torch's own function, so the bytes written are the same."""

from __future__ import annotations

import torch
from torch.distributed.fsdp._fully_shard import _fsdp_collectives  # noqa: F401  (defines the fsdp:: ops)

_registered: dict[str, torch.library.Library] = {}


@torch.no_grad()
def all_gather_copy_in(inputs: list[torch.Tensor], output: torch.Tensor, split_sizes: list[int],
                       input_numel: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each parameter's shard into its place in this rank's part of the all-gather buffer."""
    mine = output.narrow(0, input_numel * rank, input_numel)
    for dst, src in zip(torch.split(mine, split_sizes), inputs):
        dst.copy_(src)
    return mine, output


@torch.no_grad()
def split_with_sizes_copy(gathered: torch.Tensor, split_sizes: list[int], dim: int = 0, *,
                          out: list[torch.Tensor]) -> None:
    """The gathered buffer, [world, shard numel], split by columns into each parameter's
    [world, n] view: row r of each piece is one contiguous copy."""
    if dim != 1 or gathered.dim() != 2 or not all(o.is_contiguous() for o in out):
        torch.split_with_sizes_copy(gathered, split_sizes, dim=dim, out=out)
        return
    for src, dst in zip(torch.split(gathered, split_sizes, dim=1), out):
        for row in range(gathered.size(0)):
            dst[row].copy_(src[row])


@torch.no_grad()
def chunk_cat(tensors: list[torch.Tensor], dim: int, num_chunks: int, *, out: torch.Tensor) -> None:
    """Each gradient cut into `num_chunks` rows along dim 0, row r of every gradient side by side in
    row r of out [num_chunks, total / num_chunks]: one contiguous copy per gradient and row."""
    if dim != 0 or any(t.size(0) % num_chunks or not t.is_contiguous() for t in tensors):
        torch._chunk_cat(tensors, dim, num_chunks, out=out)  # zero-pads uneven chunks
        return
    rows_out, start = out.view(num_chunks, -1), 0
    for tensor in tensors:
        rows = tensor.view(num_chunks, -1)
        for row in range(num_chunks):
            rows_out[row, start:start + rows.size(1)].copy_(rows[row])
        start += rows.size(1)


def use_copy_engines(dispatch_key: str = "CUDA") -> None:
    """Register the three copies above as FSDP2's kernels for `dispatch_key`, for the rest of the
    process (idempotent). Tests pass "CPU" to run them under gloo."""
    if dispatch_key in _registered:
        return
    library = torch.library.Library("fsdp", "IMPL")
    for op in (all_gather_copy_in, split_with_sizes_copy, chunk_cat):
        library.impl(op.__name__, op, dispatch_key, allow_override=True)  # torch 2.11 refuses by default
    _registered[dispatch_key] = library  # torch drops a library's kernels when it is collected


def use_torch_kernels(dispatch_key: str = "CUDA") -> None:
    """Undo `use_copy_engines`: FSDP2's own kernels again."""
    library = _registered.pop(dispatch_key, None)
    if library is not None:
        library._destroy()
