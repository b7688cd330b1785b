"""`parallelism.sharding=per-param`: FSDP's layout with collectives that copy nothing.

FSDP2 packs a unit's shards into one buffer before each all-gather, unpacks the gathered rows
into each parameter after it, and packs the gradients before each reduce-scatter: three
memory-bound copies per collective, two of them on the computation's stream. Here every
parameter is its own Shard(0) DTensor, as in FSDP2, but its collectives read and write its own
tensors: the all-gather goes from the parameter's shard straight into its gathered tensor (dim 0
of a Shard(0) tensor is rank-major), the reduce-scatter from its gradient straight into its
gradient shard; one unit's collectives go to the backend as one group.

The rest follows FSDP2. The units are the decoder blocks and the root (what is left: embedding,
final norm, LM head). A unit gathers before its forward and, unless it keeps them for backward,
frees the gathered tensors after it; backward gathers each unit again (the next one is
prefetched), and reduce-scatters a unit's gradients as soon as they have all arrived (under HSDP
then all-reduces them over the replicas, once per step). Between
steps the modules hold the sharded parameters, so the optimizer, the gradient norm and the
checkpoint see exactly what they see under FSDP2.

It leans on the torch internals FSDP2 itself uses: the coalescing manager, version counters kept
across a storage's refill, DTensor's spec and local tensor, the autograd engine's end-of-backward
callback. tests/test_train.py pins it to FSDP2's bits, so a torch upgrade that moves them shows."""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd import Variable
from torch.distributed import _symmetric_memory as symm_mem
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.utils._pytree import tree_leaves

# torch 2.13 renamed the tensor collectives (the old names warn); the GPU host's 2.11 has only the old ones.
_all_gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_reduce_scatter = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


class Unit:
    """One unit's parameters: DTensors sharded on dim 0 (what the optimizer holds) between steps, whole
    tensors (`gathered`) from its forward to its backward. A gathered tensor keeps its identity
    and only its storage is freed and allocated again, so what autograd saved in forward sees the
    data gathered again for backward.

    Gathered tensors and gradient shards are allocated on the computation's stream, which frees
    and reuses memory in its own order: the gather stream waits for it after each allocation, and
    what the reduce stream reads is kept until the computation has waited for it."""

    def __init__(self, sharding: PerParamSharding, module: nn.Module, slots: list[tuple[nn.Module, str]], *,
                 reshard_after_forward: bool):
        self.sharding, self.module, self.slots = sharding, module, slots
        self.index = len(sharding.units)  # in forward order: 0 is the root
        self.reshard_after_forward = reshard_after_forward
        self.gathered: list[nn.Parameter] = []  # made at the first gather, on the parameters' device
        self.state = "sharded"  # -> "pending" (all-gather issued) -> "gathered"
        self.gather_event: torch.cuda.Event | None = None
        self.update_event: torch.cuda.Event | None = None  # the optimizer's, beside the forward
        self.grads_arrived, self.grads_expected = 0, 0
        self.partial: list[torch.Tensor] | None = None  # HSDP: earlier micro-batches, reduced over the shards only
        self.sharded = [self._shard(owner, leaf) for owner, leaf in slots]
        self._use(self.sharded)

    def _shard(self, owner: nn.Module, leaf: str) -> nn.Parameter:
        param = owner._parameters[leaf]
        local = torch.empty((param.shape[0] // self.sharding.world_size, *param.shape[1:]), dtype=param.dtype,
                            device=param.device)
        return nn.Parameter(DTensor.from_local(local, self.sharding.mesh, self.sharding.placements, run_check=False),
                            requires_grad=param.requires_grad)

    def _use(self, params: list[nn.Parameter]) -> None:
        for (owner, leaf), param in zip(self.slots, params):
            owner._parameters[leaf] = param

    def _make_gathered(self) -> None:
        for sharded in self.sharded:
            param = nn.Parameter(torch.empty(sharded.shape, dtype=self.sharding.param_dtype,
                                             device=sharded.device), requires_grad=sharded.requires_grad)
            param.untyped_storage().resize_(0)
            if param.requires_grad:
                param.register_post_accumulate_grad_hook(self._grad_arrived)
                self.grads_expected += 1
            self.gathered.append(param)

    @torch.no_grad()
    def gather(self) -> None:
        """Issue the all-gathers on the gather stream; `wait` makes the computation wait for them."""
        if self.state != "sharded":
            return
        # The modules' own: to_empty, to() and loading a checkpoint may have replaced the Parameters.
        self.sharded = [owner._parameters[leaf] for owner, leaf in self.slots]
        if not self.gathered:
            self._make_gathered()
        sharding = self.sharding
        with sharding.gathered_memory():
            for param in self.gathered:
                param.untyped_storage().resize_(param.numel() * param.element_size())
        # Writing the same data again: what autograd saved of these tensors in forward stays valid.
        with sharding.on(sharding.gather_stream, after=self.update_event), \
                torch.autograd._unsafe_preserve_version_counter(tuple(self.gathered)):
            # A cast (only without master weights) is made, read and freed on the gather stream.
            inputs = [s._local_tensor.to(sharding.param_dtype) for s in self.sharded]
            if sharding.copy_engine:  # gather in place, between registered buffers
                inputs = [sharding.place_shard(param, shard) for param, shard in zip(self.gathered, inputs)]
            with sharding.coalesced(sharding.gather_group):
                for param, shard in zip(self.gathered, inputs):
                    _all_gather(param, shard, group=sharding.gather_group)
            self.gather_event = sharding.record(sharding.gather_stream)
        self.update_event, self.state = None, "pending"

    def wait(self) -> None:
        """Gather if not yet done, make the computation wait for it, and put the gathered tensors in the modules."""
        self.gather()
        if self.state == "pending":
            if self.gather_event is not None:
                torch.cuda.current_stream().wait_event(self.gather_event)
            self.gather_event, self.state = None, "gathered"
            self._use(self.gathered)

    def reshard(self) -> None:
        if self.state == "sharded":
            return
        self.wait()
        for param in self.gathered:
            param.untyped_storage().resize_(0)
        self._use(self.sharded)
        self.state = "sharded"

    def _grad_arrived(self, param: nn.Parameter) -> None:
        self.grads_arrived += 1
        if self.grads_arrived == self.grads_expected:
            self.reduce_scatter()
            self.reshard()

    @torch.no_grad()
    def reduce_scatter(self) -> None:
        """Reduce-scatter (the mean over ranks) the gathered gradients into the sharded ones, on the
        reduce stream; the end of backward makes the computation wait for it. Under HSDP the
        shards are then all-reduced over the replicas, once per step: earlier micro-batches wait
        in `partial` (as FSDP2's `set_requires_all_reduce`)."""
        self.grads_arrived = 0
        pairs = [(s, g) for s, g in zip(self.sharded, self.gathered) if g.grad is not None]
        if not pairs:
            return
        sharding = self.sharding
        sharding.release_reduced()
        inputs = [g.grad.to(sharding.reduce_dtype) for _, g in pairs]  # a cast only if the dtypes differ
        outputs = [torch.empty_like(s._local_tensor, dtype=sharding.reduce_dtype) for s, _ in pairs]
        for _, gathered in pairs:
            gathered.grad = None
        earlier = self.partial or []  # read below on the reduce stream
        with sharding.on(sharding.reduce_stream):
            with sharding.coalesced(sharding.group):
                for output, full in zip(outputs, inputs):
                    _reduce_scatter(output, full, op=sharding.reduce_op, group=sharding.group)
            sharding.finish_mean(outputs, sharding.world_size)
            if sharding.replicate_group is None or self._all_reduce(outputs):
                for (sharded, _), output in zip(pairs, outputs):
                    grad = output.to(sharded.dtype)
                    if sharded.grad is None:  # the parameter's own spec: same mesh, placements, shape and dtype
                        sharded.grad = DTensor(grad, sharded._spec, requires_grad=False)
                    else:  # accumulation over micro-batches, as FSDP2 sums them into the shards
                        sharded.grad._local_tensor.add_(grad)
        # Made on the computation's stream, read or written by the reduce-scatter: kept until it is done.
        sharding.being_reduced = (inputs + outputs + earlier, sharding.record(sharding.reduce_stream))

    def _all_reduce(self, outputs: list[torch.Tensor]) -> bool:
        """HSDP: add the micro-batches held back, then hold these back too (False) or all-reduce
        them over the replicas (True: they are the step's gradient shards)."""
        sharding = self.sharding
        if self.partial is not None:
            torch._foreach_add_(outputs, self.partial)
            self.partial = None
        if not sharding.requires_all_reduce:
            self.partial = outputs
            return False
        with sharding.coalesced(sharding.replicate_group):
            for output in outputs:
                dist.all_reduce(output, op=sharding.reduce_op, group=sharding.replicate_group)
        sharding.finish_mean(outputs, sharding.replicate_group.size())
        return True

    # The hooks. A compiled block runs them eagerly.

    @torch.compiler.disable
    def pre_forward(self, module: nn.Module, args) -> None:
        self.wait()
        following = self.sharding.forward_next(self)
        if following is not None:
            following.gather()  # prefetch: its all-gather runs beside this unit's forward

    @torch.compiler.disable
    def post_forward(self, module: nn.Module, args, output) -> None:
        if torch.is_grad_enabled():
            outputs = [t for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.requires_grad]
            if outputs:
                torch.autograd.graph.register_multi_grad_hook(outputs, self._pre_backward, mode="any")
            if self.reshard_after_forward:
                self.reshard()
        elif self is self.sharding.units[0]:  # the root, and no backward follows: free everything
            for unit in self.sharding.units:
                unit.reshard()
        elif self.reshard_after_forward:
            self.reshard()

    def _pre_backward(self, grad) -> None:
        self.sharding.start_backward()
        self.wait()
        following = self.sharding.backward_next(self)
        if following is not None:
            following.gather()  # prefetch: its all-gather runs beside this unit's backward


class PerParamSharding:
    """The units of one model and what they share: mesh, dtypes, the gather and reduce streams,
    the gradients being reduced, the end of backward."""

    def __init__(self, mesh: DeviceMesh, *, param_dtype: torch.dtype, reduce_dtype: torch.dtype,
                 copy_engine_group: dist.ProcessGroup | None = None):
        # build_mesh's dims: ("dp_shard",), or ("dp_replicate", "dp_shard") for HSDP, whose shards FSDP2 places so too.
        self.mesh, self.group = mesh, mesh.get_group("dp_shard")
        self.replicate_group = mesh.get_group("dp_replicate") if mesh.ndim == 2 else None
        self.placements = [Shard(0)] if mesh.ndim == 1 else [Replicate(), Shard(0)]
        self.requires_all_reduce = True
        self.world_size, self.rank = self.group.size(), self.group.rank()
        # all_gather=copy-engine: gathered tensors in NCCL symmetric memory, gathered on a zero-CTA communicator.
        self.copy_engine = copy_engine_group is not None
        self.gather_group = copy_engine_group or self.group
        self.param_dtype, self.reduce_dtype = param_dtype, reduce_dtype
        cuda = mesh.device_type == "cuda"
        self.reduce_op = dist.ReduceOp.AVG if cuda else dist.ReduceOp.SUM  # NCCL averages; gloo only sums
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        self.gather_stream = torch.cuda.Stream() if cuda else None
        self.reduce_stream = torch.cuda.Stream() if cuda else None
        self.units: list[Unit] = []  # forward order: the root, then the blocks
        self.being_reduced: tuple[list[torch.Tensor], torch.cuda.Event | None] | None = None
        self.in_backward = False

    def add(self, module: nn.Module, slots: list[tuple[nn.Module, str]], *, reshard_after_forward: bool) -> Unit:
        unit = Unit(self, module, slots, reshard_after_forward=reshard_after_forward)
        self.units.append(unit)
        module.register_forward_pre_hook(unit.pre_forward)
        module.register_forward_hook(unit.post_forward)
        return unit

    def set_requires_all_reduce(self, requires_all_reduce: bool) -> None:
        """HSDP: whether this micro-batch's backward all-reduces over the replicas (the step's last
        does; FSDP2's method of the same name)."""
        self.requires_all_reduce = requires_all_reduce

    def register_forward_method(self, module: nn.Module, name: str) -> None:
        """Gather around `module.<name>(...)` as around its forward (decoding's prefill and step)."""
        unit = next(unit for unit in self.units if unit.module is module)
        method = getattr(module, name)

        @functools.wraps(method)
        def gathered(*args, **kwargs):
            unit.pre_forward(module, args)
            output = method(*args, **kwargs)
            unit.post_forward(module, args, output)
            return output

        setattr(module, name, gathered)

    def gathered_memory(self):
        """Where gathered tensors are allocated: NCCL's registered pool for copy-engine all-gathers
        (registered once per segment, reused by every unit), else the caching allocator."""
        if not self.copy_engine:
            return contextlib.nullcontext()
        return torch.cuda.use_mem_pool(symm_mem.get_mem_pool(self.device))

    def place_shard(self, param: torch.Tensor, shard: torch.Tensor) -> torch.Tensor:
        """Copy this rank's shard into its rows of `param` (a memcpy: the copy engines, not SMs),
        register `param`, and return those rows: the input of an in-place all-gather."""
        mine = param.view(-1).narrow(0, self.rank * shard.numel(), shard.numel())
        mine.copy_(shard.view(-1))
        symm_mem.rendezvous(param, group=self.gather_group.group_name)
        return mine

    @contextlib.contextmanager
    def on(self, stream: torch.cuda.Stream | None, after: torch.cuda.Event | None = None):
        """On `stream` (the gather or reduce stream; nothing without CUDA), after what the
        computation's stream has queued (the optimizer's writes to the shards, the gradients, the
        last use of reused memory) and after `after`."""
        if stream is None:
            yield
            return
        stream.wait_stream(torch.cuda.current_stream())
        if after is not None:
            stream.wait_event(after)
        with torch.cuda.stream(stream):
            yield

    def record(self, stream: torch.cuda.Stream | None) -> torch.cuda.Event | None:
        return stream.record_event() if stream is not None else None

    def finish_mean(self, tensors: list[torch.Tensor], ranks: int) -> None:
        """After a collective with `reduce_op`: NCCL's AVG has averaged; gloo only sums, so divide."""
        if self.reduce_op == dist.ReduceOp.SUM:
            torch._foreach_div_(tensors, ranks)

    def coalesced(self, group: dist.ProcessGroup):
        """A unit's collectives on `group` as one group: one launch."""
        return dist._coalescing_manager(group=group, device=self.device if self.device.type == "cuda" else None)

    def release_reduced(self) -> None:
        """Let the last reduce-scatter's inputs be freed: the computation reuses their memory only
        after the reduce-scatter read them."""
        if self.being_reduced is not None:
            _, event = self.being_reduced
            if event is not None:
                torch.cuda.current_stream().wait_event(event)
            self.being_reduced = None

    def forward_next(self, unit: Unit) -> Unit | None:
        return self.units[unit.index + 1] if unit.index + 1 < len(self.units) else None

    def backward_next(self, unit: Unit) -> Unit | None:
        """The unit whose backward comes after `unit`'s: the last block after the root's LM head,
        then the blocks in reverse; none after the first block (the root stays gathered)."""
        index = unit.index
        return self.units[-1] if index == 0 else (self.units[index - 1] if index > 1 else None)

    def start_backward(self) -> None:
        if not self.in_backward:
            self.in_backward = True
            Variable._execution_engine.queue_callback(self._end_backward)

    def _end_backward(self) -> None:
        for unit in self.units:
            if unit.grads_arrived:  # some parameters got no gradient: reduce those that did
                unit.reduce_scatter()
            unit.reshard()
        self.release_reduced()
        if self.reduce_stream is not None:
            torch.cuda.current_stream().wait_stream(self.reduce_stream)
        self.in_backward = False


def shard_per_parameter(model: nn.Module, mesh: DeviceMesh, *, kept_gathered: int, param_dtype: torch.dtype,
                        reduce_dtype: torch.dtype, copy_engine_group: dist.ProcessGroup | None = None
                        ) -> PerParamSharding:
    """Shard `model` (built on the meta device; `to_empty` and `init_weights` follow) with one unit
    per decoder block and one for the root; the last `kept_gathered` blocks keep their gathered
    parameters from forward to backward. With `copy_engine_group` (a zero-CTA communicator over
    the mesh's ranks) the all-gathers run on the GPUs' copy engines."""
    sharding = PerParamSharding(mesh, param_dtype=param_dtype, reduce_dtype=reduce_dtype,
                                copy_engine_group=copy_engine_group)
    for name, param in model.named_parameters():
        if param.dim() == 0 or param.shape[0] % sharding.world_size:
            raise ValueError(f"parallelism.sharding=per-param splits dim 0 of every parameter evenly over the "
                             f"{sharding.world_size} shard ranks; {name.replace(_CHECKPOINT_PREFIX, '')} has shape "
                             f"{tuple(param.shape)} (parallelism.sharding=fsdp2 pads it)")
    blocks = list(model.layers)
    in_blocks = {id(m) for block in blocks for m in block.modules()}

    def slots(modules) -> list[tuple[nn.Module, str]]:
        return [(m, leaf) for m in modules for leaf, p in m._parameters.items() if p is not None]

    sharding.add(model, slots(m for m in model.modules() if id(m) not in in_blocks), reshard_after_forward=False)
    first_kept = len(blocks) - kept_gathered
    for index, block in enumerate(blocks):
        sharding.add(block, slots(block.modules()), reshard_after_forward=index < first_kept)
    model.per_param_sharding = sharding
    return sharding
