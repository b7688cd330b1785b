"""parallelism.sharding=per-param on its own: what is gathered when, and the inputs it refuses.
(Its training against FSDP2, to the bit, is in test_train.py.)"""

import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.tensor import DTensor

from fms_bamba.config import ParallelismSection
from fms_bamba.model import Bamba, BambaConfig
from fms_bamba.parallel import apply_parallelism, build_mesh, check_fsdp_options


@pytest.fixture
def one_rank():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def sharded_tiny(reshard_after_forward: str) -> Bamba:
    cfg = ParallelismSection(sharding="per-param", reshard_after_forward=reshard_after_forward)
    with torch.device("meta"):
        model = Bamba(BambaConfig.from_preset("tiny", mamba_chunk_size=8))
    apply_parallelism(model, build_mesh(cfg, torch.device("cpu")), cfg)
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights()
    return model


def holds_gathered(unit) -> bool:
    """Whether the unit's modules hold its whole tensors (else its shards)."""
    return not any(isinstance(owner._parameters[leaf], DTensor) for owner, leaf in unit.slots)


def test_gathered_parameters_live_from_forward_to_backward_as_the_policy_says(one_rank):
    model = sharded_tiny("keep-last-1")
    sharding, blocks = model.per_param_sharding, list(model.layers)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    loss = model(ids, labels=ids)
    # After forward: the root and the last block keep their gathered tensors; the others hold shards again.
    assert [holds_gathered(unit) for unit in sharding.units] == [True] + [False] * (len(blocks) - 1) + [True]
    assert all(p.untyped_storage().size() == 0 for unit in sharding.units[1:-1] for p in unit.gathered)
    loss.backward()
    # After backward: every unit freed what it gathered, and the shards hold the mean gradient.
    for unit in sharding.units:
        assert all(p.untyped_storage().size() == 0 and p.grad is None for p in unit.gathered)
    params = list(model.parameters())
    assert all(isinstance(p, DTensor) and isinstance(p.grad, DTensor) for p in params)
    assert all(torch.isfinite(p.grad.to_local()).all() for p in params)
    # A forward without gradients (evaluation) leaves nothing gathered.
    with torch.no_grad():
        model(ids, labels=ids)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    assert all(p.untyped_storage().size() == 0 for unit in sharding.units for p in unit.gathered)


def test_one_rank_per_param_computes_what_the_plain_model_does(one_rank):
    """Gathering and reducing over one rank change nothing: the loss and every gradient equal the
    unsharded model's (same weights, fp32 on CPU)."""
    model = sharded_tiny("default")
    plain = Bamba(model.config)
    full = {name: p.full_tensor() for name, p in model.named_parameters()}
    with torch.no_grad():
        for name, param in plain.named_parameters():
            param.copy_(full.pop(name))
    assert not full
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    model(ids, labels=ids).backward()
    plain(ids, labels=ids).backward()
    grads = dict(plain.named_parameters())
    for name, param in model.named_parameters():
        assert torch.equal(param.grad.full_tensor(), grads[name].grad), name


@pytest.mark.parametrize("fields, message", [
    ({"sharding": "flat"}, "parallelism.sharding must be one of"),
])
def test_bad_sharding_options_are_named(fields, message):
    with pytest.raises(ValueError, match=message):
        check_fsdp_options(ParallelismSection(**fields), "cuda")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def uneven_worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        model = nn.Module()
        model.layers = nn.ModuleList([nn.Linear(4, 3)])
        cfg = ParallelismSection(sharding="per-param")
        with pytest.raises(ValueError, match=r"over the 2 shard ranks; layers.0.weight has shape \(3, 4\)"):
            apply_parallelism(model, build_mesh(cfg, torch.device("cpu")), cfg)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_a_parameter_that_does_not_split_evenly_is_named():
    mp.spawn(uneven_worker, args=(free_port(),), nprocs=2, join=True)
