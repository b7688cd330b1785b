"""Process groups, the device mesh, and `apply_parallelism`: activation checkpointing, compile
and FSDP2 / HSDP applied to a Bamba model in place."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    checkpoint_wrapper,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from fms_bamba.config import ParallelismSection


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job, read from torchrun's environment (1 process without it)."""

    rank: int
    local_rank: int
    world_size: int


def dist_info_from_env() -> DistInfo:
    return DistInfo(rank=int(os.environ.get("RANK", 0)), local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                    world_size=int(os.environ.get("WORLD_SIZE", 1)))


def resolve_mesh_shape(cfg: ParallelismSection, world_size: int) -> tuple[int, int]:
    """(replicate, shard) sizes; raises ValueError naming the field when they don't fit the world."""
    if cfg.dp_replicate < 1:
        raise ValueError(f"parallelism.dp_replicate must be >= 1, got {cfg.dp_replicate}")
    shard = world_size // cfg.dp_replicate if cfg.dp_shard == -1 else cfg.dp_shard
    if shard < 1 or cfg.dp_replicate * shard != world_size:
        raise ValueError(f"parallelism.dp_replicate ({cfg.dp_replicate}) x parallelism.dp_shard "
                         f"({cfg.dp_shard}) must equal the number of processes ({world_size})")
    return cfg.dp_replicate, shard


def _count_after(mode: str, prefix: str) -> int | None:
    """N of a "prefix-N" option value, or None when mode is not one."""
    head, _, count = mode.rpartition("-")
    return int(count) if head == prefix and count.isdigit() else None


def parse_activation_checkpoint(mode: str) -> int:
    """Checkpoint every N-th block: 0 = none, 1 = full, N for 'every-N'."""
    if mode == "none":
        return 0
    if mode == "full":
        return 1
    every = _count_after(mode, "every")
    if every is not None and every >= 1:
        return every
    raise ValueError(f"parallelism.activation_checkpoint must be none | full | every-N, got {mode!r}")


RESHARD_POLICIES = ("default", "always", "never", "keep-last-N")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
"""The names `training.dtype` and `parallelism.reduce_dtype` take."""


def blocks_kept_gathered(policy: str, n_blocks: int) -> int:
    """How many of the last blocks keep their gathered params from forward to backward: the last
    one by default (backward needs it again at once), none for always, all for never, N for
    keep-last-N (backward gathers them first, so each saves one all-gather for its gathered copy
    in memory). ValueError naming the field for anything else."""
    fixed = {"default": 1, "always": 0, "never": n_blocks}
    if policy in fixed:
        return fixed[policy]
    count = _count_after(policy, "keep-last")
    if count is not None:
        return min(count, n_blocks)
    raise ValueError(f"parallelism.reshard_after_forward must be one of {RESHARD_POLICIES}, got {policy!r}")


def check_fsdp_options(cfg: ParallelismSection) -> None:
    """ValueError naming the field when reshard_after_forward or reduce_dtype is unknown."""
    blocks_kept_gathered(cfg.reshard_after_forward, 1)
    if cfg.reduce_dtype not in DTYPES:
        raise ValueError(f"parallelism.reduce_dtype must be one of {tuple(DTYPES)}, got {cfg.reduce_dtype!r}")


def init_distributed(device: torch.device) -> None:
    """Start the process group: NCCL for CUDA tensors, gloo for CPU ones. A single process
    started without torchrun gets a private one-rank group, so every code path is the same."""
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "RANK" in os.environ:  # started by torchrun (or an equivalent launcher)
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def build_mesh(cfg: ParallelismSection, device: torch.device) -> DeviceMesh:
    """1-D ("dp_shard",) mesh for FSDP, or 2-D ("dp_replicate", "dp_shard") for HSDP."""
    replicate, shard = resolve_mesh_shape(cfg, dist.get_world_size())
    if replicate == 1:
        return init_device_mesh(device.type, (shard,), mesh_dim_names=("dp_shard",))
    return init_device_mesh(device.type, (replicate, shard), mesh_dim_names=("dp_replicate", "dp_shard"))


def apply_parallelism(model: torch.nn.Module, mesh: DeviceMesh, cfg: ParallelismSection, *,
                      param_dtype: torch.dtype = torch.float32) -> None:
    """Activation checkpointing, then compile (of each block and the loss's elementwise part), then
    `fully_shard` per decoder block and the root.

    Call on a model built under torch.device("meta"); afterwards `to_empty` + `init_weights`."""
    every = parse_activation_checkpoint(cfg.activation_checkpoint)
    check_fsdp_options(cfg)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=DTYPES[cfg.reduce_dtype])
    first_kept = len(model.layers) - blocks_kept_gathered(cfg.reshard_after_forward, len(model.layers))
    for index, block in enumerate(list(model.layers)):
        if every and index % every == 0:
            # checkpoint_wrapper's prefix is stripped from state_dict and DCP keys alike.
            block = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
        if cfg.compile:
            block.compile()
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=index < first_kept)
        model.layers[index] = block
    if cfg.compile:  # the loss's softmax and its gradient, fused into two passes over each logits chunk
        model.loss_and_grad = torch.compile(model.loss_and_grad)
    fully_shard(model, mesh=mesh, mp_policy=policy)
