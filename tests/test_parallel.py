"""apply_parallelism on one CPU process: which blocks it checkpoints, compiles and shards, which
keep their gathered parameters between forward and backward, and which communicator the
copy-engine all-gathers use under each NCCL_CTA_POLICY."""

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from fms_bamba.config import ParallelismSection
from fms_bamba.model import Bamba, BambaConfig
from fms_bamba.parallel import apply_parallelism, build_mesh, zero_cta_shard_group


@pytest.fixture
def process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("policy, gathered_after_forward", [
    ("default", [False, False, True]),  # the last block's are needed again first in backward
    ("always", [False, False, False]),
    ("never", [True, True, True]),
    ("keep-last-2", [False, True, True]),
    ("keep-last-9", [True, True, True]),
])
def test_reshard_after_forward_policy(process_group, policy, gathered_after_forward):
    config = BambaConfig.from_preset("tiny", n_layers=3, attn_layer_indices=(1,))
    with torch.device("meta"):
        model = Bamba(config)
    cfg = ParallelismSection(reshard_after_forward=policy)
    apply_parallelism(model, build_mesh(cfg, torch.device("cpu")), cfg)
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights()
    ids = torch.randint(0, config.vocab_size, (2, 16))
    loss = model(ids, labels=ids)
    # A sharded block's parameters are DTensors again; a gathered one's are plain tensors.
    assert [not isinstance(block.mlp.gate_proj.weight, DTensor) for block in model.layers] == gathered_after_forward
    loss.backward()
    assert all(isinstance(p, DTensor) and p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("reduce_dtype, expected", [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_reduce_dtype_reaches_every_fsdp_unit(process_group, reduce_dtype, expected):
    with torch.device("meta"):
        model = Bamba(BambaConfig.from_preset("tiny", n_layers=2, attn_layer_indices=(1,)))
    cfg = ParallelismSection(reduce_dtype=reduce_dtype)
    apply_parallelism(model, build_mesh(cfg, torch.device("cpu")), cfg, param_dtype=torch.bfloat16)
    for unit in [*model.layers, model]:
        policy = unit._get_fsdp_state()._mp_policy
        assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, expected)


def test_checkpointing_and_compile_wrap_the_blocks_they_name(process_group):
    config = BambaConfig.from_preset("tiny", n_layers=5, attn_layer_indices=(1,))
    with torch.device("meta"):
        model = Bamba(config)
    loss_and_grad = model.loss_and_grad
    cfg = ParallelismSection(activation_checkpoint="every-2", compile=True)
    apply_parallelism(model, build_mesh(cfg, torch.device("cpu")), cfg)
    assert [isinstance(block, CheckpointWrapper) for block in model.layers] == [True, False, True, False, True]
    assert all(block._compiled_call_impl is not None for block in model.layers)
    assert all(isinstance(unit, FSDPModule) for unit in (*model.layers, model))
    assert model.loss_and_grad is not loss_and_grad  # the compiled loss replaced the eager one
    assert not any("checkpoint_wrapped" in name or "_orig_mod" in name for name in model.state_dict())


def test_all_gathers_keep_the_mesh_group_under_the_zero_cta_default(process_group, monkeypatch):
    monkeypatch.setenv("NCCL_CTA_POLICY", "2")
    mesh = build_mesh(ParallelismSection(), torch.device("cpu"))
    assert zero_cta_shard_group(mesh) is mesh.get_group("dp_shard")


@pytest.mark.parametrize("ranks, rows", [([[0, 1, 2, 3]], [[0, 1, 2, 3]]),  # FSDP: one group of all
                                         ([[0, 1], [2, 3]], [[0, 1], [2, 3]])])  # HSDP: one per replica
def test_all_gathers_get_a_zero_cta_group_per_shard_row_under_another_policy(monkeypatch, ranks, rows):
    monkeypatch.setenv("NCCL_CTA_POLICY", "0")
    made = {}

    class Options:  # stands in for ProcessGroupNCCL.Options, absent from CPU builds
        def __init__(self):
            self.config = SimpleNamespace(cta_policy=0)

    def new_subgroups_by_enumeration(ranks_per_group, backend, pg_options):
        made.update(rows=ranks_per_group, backend=backend, policy=pg_options.config.cta_policy)
        return "own group", []

    monkeypatch.setattr(dist, "ProcessGroupNCCL", SimpleNamespace(Options=Options), raising=False)
    monkeypatch.setattr(dist, "new_subgroups_by_enumeration", new_subgroups_by_enumeration)
    mesh = SimpleNamespace(mesh=torch.tensor(ranks))
    assert zero_cta_shard_group(mesh) == "own group"
    assert made == {"rows": rows, "backend": "nccl", "policy": 2}
