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
from torch.distributed import _symmetric_memory as symm_mem
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather

from fms_bamba.config import ParallelismSection
from fms_bamba.sharding import shard_per_parameter


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


ALL_GATHERS = ("nccl", "copy-engine")
SHARDINGS = ("fsdp2", "per-param")


def check_fsdp_options(cfg: ParallelismSection, device_type: str) -> None:
    """ValueError naming the field when reshard_after_forward, reduce_dtype, all_gather or sharding
    is unknown, or an option is asked of a device or mesh without it."""
    blocks_kept_gathered(cfg.reshard_after_forward, 1)
    if cfg.reduce_dtype not in DTYPES:
        raise ValueError(f"parallelism.reduce_dtype must be one of {tuple(DTYPES)}, got {cfg.reduce_dtype!r}")
    if cfg.all_gather not in ALL_GATHERS:
        raise ValueError(f"parallelism.all_gather must be one of {ALL_GATHERS}, got {cfg.all_gather!r}")
    if cfg.all_gather == "copy-engine" and device_type != "cuda":
        raise ValueError(f"parallelism.all_gather=copy-engine needs CUDA devices (NCCL), not {device_type}")
    if cfg.sharding not in SHARDINGS:
        raise ValueError(f"parallelism.sharding must be one of {SHARDINGS}, got {cfg.sharding!r}")


ZERO_CTA_POLICY = 2
"""NCCL_CTA_POLICY_ZERO: the communicator runs collectives on copy engines, with no CTAs, where it can."""


def zero_cta_shard_group(mesh: DeviceMesh) -> dist.ProcessGroup:
    """The communicator for the copy-engine all-gathers over this rank's "dp_shard" ranks: the
    mesh's own when every communicator is zero-CTA already (NCCL_CTA_POLICY=2, `init_distributed`'s
    default), else one of its own created with that policy, so that NCCL_CTA_POLICY=0|1 gives the
    reduce-scatters another policy without taking the all-gathers off the copy engines. Every rank
    must call it."""
    if os.environ.get("NCCL_CTA_POLICY") == str(ZERO_CTA_POLICY):
        return mesh.get_group("dp_shard")
    options = dist.ProcessGroupNCCL.Options()
    options.config.cta_policy = ZERO_CTA_POLICY
    rows = mesh.mesh.reshape(-1, mesh.mesh.shape[-1]).tolist()  # "dp_shard" is build_mesh's last dim
    group, _ = dist.new_subgroups_by_enumeration(rows, backend="nccl", pg_options=options)
    return group


def copy_engine_group(mesh: DeviceMesh) -> dist.ProcessGroup:
    """`zero_cta_shard_group`, ready for symmetric-memory rendezvous: NCCL as the symmetric-memory
    backend, and the communicator created. Every rank must call it."""
    symm_mem.set_backend("NCCL")
    group = zero_cta_shard_group(mesh)
    dist.barrier(group=group)  # the communicator must exist before the first rendezvous
    return group


class CopyEngineAllGather(AllGather):
    """FSDP2's all-gather with its output buffers in NCCL symmetric memory, on a zero-CTA
    communicator (`copy_engine_group`), so that NCCL (>= 2.28) moves the shards with
    the GPUs' copy engines instead of kernels that occupy SMs beside the matmuls."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        # One pool of registered memory, reused by every all-gather: registration happens once per segment.
        with torch.cuda.use_mem_pool(symm_mem.get_mem_pool(device)):
            return torch.empty(size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 async_op: bool = False):
        # FSDP passes its mesh group; ours has the same ranks in the same order (or is that group).
        # FSDP gathers in place (the input is this rank's slice of the output): register the output only.
        symm_mem.rendezvous(output_tensor, group=self.group.group_name)
        return dist.all_gather_into_tensor(output_tensor, input_tensor, group=self.group, async_op=async_op)


def init_distributed(device: torch.device, cfg: ParallelismSection | None = None) -> None:
    """Start the process group: NCCL for CUDA tensors, gloo for CPU ones. A single process
    started without torchrun gets a private one-rank group, so every code path is the same."""
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    if cfg is not None and cfg.all_gather == "copy-engine":
        # Every communicator's policy, zero-CTA unless the environment says otherwise. It decides the
        # reduce-scatters' (0 default, 1 efficiency, 2 zero-CTA: fewer SMs for longer); under 0 or 1
        # the all-gathers get a zero-CTA communicator of their own (zero_cta_shard_group).
        os.environ.setdefault("NCCL_CTA_POLICY", str(ZERO_CTA_POLICY))
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


def compile_model(model: torch.nn.Module) -> None:
    """`torch.compile` each decoder block (as wrapped) and the loss's elementwise part, in place:
    what `parallelism.compile` compiles, for the trainer and for benchmarks of the model alone."""
    for block in model.layers:
        block.compile()
    # The loss's softmax and its gradient, fused into two passes over each logits chunk.
    model.loss_and_grad = torch.compile(model.loss_and_grad)


def apply_parallelism(model: torch.nn.Module, mesh: DeviceMesh, cfg: ParallelismSection, *,
                      param_dtype: torch.dtype = torch.float32) -> None:
    """Activation checkpointing, then compile (of each block and the loss's elementwise part), then
    `fully_shard` (or, with sharding=per-param, `shard_per_parameter`) per decoder block and the root.

    Call on a model built under torch.device("meta"); afterwards `to_empty` + `init_weights`."""
    every = parse_activation_checkpoint(cfg.activation_checkpoint)
    check_fsdp_options(cfg, mesh.device_type)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=DTYPES[cfg.reduce_dtype])
    kept_gathered = blocks_kept_gathered(cfg.reshard_after_forward, len(model.layers))
    if every:
        for index in range(0, len(model.layers), every):
            # checkpoint_wrapper's prefix is stripped from state_dict and DCP keys alike.
            model.layers[index] = checkpoint_wrapper(model.layers[index],
                                                     checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    if cfg.compile:
        compile_model(model)
    if cfg.sharding == "per-param":
        shard_per_parameter(model, mesh, kept_gathered=kept_gathered, param_dtype=param_dtype,
                            reduce_dtype=DTYPES[cfg.reduce_dtype],
                            copy_engine_group=copy_engine_group(mesh) if cfg.all_gather == "copy-engine" else None)
        return
    for index, block in enumerate(model.layers):
        fully_shard(block, mesh=mesh, mp_policy=policy,
                    reshard_after_forward=index < len(model.layers) - kept_gathered)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    if cfg.all_gather == "copy-engine":
        all_gather = CopyEngineAllGather(copy_engine_group(mesh))
        for unit in (*model.layers, model):
            unit.set_custom_all_gather(all_gather)
