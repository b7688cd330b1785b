"""init_weights and optimizer_param_groups on FSDP2 DTensor shards (2 CPU processes, gloo)."""

import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from fms_bamba.model import Bamba, BambaConfig, optimizer_param_groups


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sharded_init_worker(rank: int, world_size: int, port: int) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        config = BambaConfig.from_preset("tiny", mamba_chunk_size=8)
        with torch.device("meta"):
            model = Bamba(config)
        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        model.to_empty(device="cpu")
        model.init_weights()
        assert all(isinstance(p, DTensor) for p in model.parameters())
        full = {name: p.full_tensor() for name, p in model.named_parameters()}
        for name, tensor in full.items():
            assert torch.isfinite(tensor).all(), name
        mixer = "layers.0.mixer."
        A = full[mixer + "A_log"].exp()
        assert ((A >= 1) & (A <= 16)).all()
        dt = F.softplus(full[mixer + "dt_bias"])
        assert ((dt >= 0.999e-3) & (dt <= 0.1001)).all()
        assert (full[mixer + "D"] == 1).all() and (full["norm.weight"] == 1).all()
        assert abs(full["tok_embeddings.weight"].std().item() - 0.02) < 0.002

        decay, no_decay = optimizer_param_groups(model, weight_decay=0.1)
        reference = Bamba(config)
        expected_decay, expected_no_decay = optimizer_param_groups(reference, weight_decay=0.1)
        assert len(decay["params"]) == len(expected_decay["params"])
        assert len(no_decay["params"]) == len(expected_no_decay["params"])

        ids = torch.randint(0, config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(rank))
        loss = model(ids, labels=ids)
        loss.backward()
        assert torch.isfinite(loss)
        # Both ranks done before either tears gloo down: once in ~18 runs, without this, a rank
        # aborted at teardown ("terminate called without an active exception" in gloo's threads).
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_init_weights_on_fsdp2_shards():
    mp.spawn(sharded_init_worker, args=(2, free_port()), nprocs=2, join=True)
