"""HostStager: the async save's copy into host buffers, kept from one save to the next."""

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from fms_bamba.staging import HostStager


def test_stages_a_copy_into_buffers_kept_until_a_shape_changes():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        weight = distribute_tensor(torch.randn(6, 4), mesh, [Shard(0)])
        state = {"weight": weight, "rng": torch.arange(5), "step": 3, "groups": [{"lr": 0.1}]}
        stager = HostStager(shared=False)
        staged = stager.stage(state).result()

        assert isinstance(staged["weight"], DTensor) and staged["weight"].placements == weight.placements
        assert staged["weight"].shape == weight.shape
        assert torch.equal(staged["weight"].to_local(), weight.to_local())
        assert torch.equal(staged["rng"], state["rng"]) and staged["step"] == 3
        assert staged["groups"] == state["groups"] and staged["groups"] is not state["groups"]
        weight.to_local().add_(1)  # training goes on: the staged copy must not follow
        assert not torch.equal(staged["weight"].to_local(), weight.to_local())

        buffers = dict(stager.buffers)
        state["rng"] = torch.arange(7)  # e.g. the Python RNG state's JSON grew
        again = stager.stage(state).result()
        assert stager.buffers["weight"] is buffers["weight"]  # the same host memory, refilled
        assert stager.buffers["rng"] is not buffers["rng"] and torch.equal(again["rng"], torch.arange(7))
        assert torch.equal(again["weight"].to_local(), weight.to_local())
        stager.close()
        assert not stager.buffers
    finally:
        dist.destroy_process_group()
