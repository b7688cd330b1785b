"""parallelism.fsdp_copies=copy-engine: FSDP2's three copies made piece by piece (fms_bamba/fsdp_copies.py)
write the same bytes as torch's kernels, and FSDP2 reaches them through the dispatcher (checked
on CPU under gloo, registered for the CPU key; on GPU they are registered for CUDA)."""

import os
from datetime import timedelta
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fms_bamba import fsdp_copies
from fms_bamba.config import ParallelismSection
from fms_bamba.model import Bamba, BambaConfig
from fms_bamba.parallel import apply_parallelism, build_mesh, check_fsdp_options
from test_model_fsdp import free_port


def test_all_gather_copy_in_matches_torch():
    sizes, world, rank = [6, 4, 10], 3, 1
    inputs = [torch.randn(n) for n in sizes]
    expected_out, out = torch.zeros(sum(sizes) * world), torch.zeros(sum(sizes) * world)
    expected_mine, _ = torch.ops.fsdp.all_gather_copy_in(inputs, expected_out, sizes, sum(sizes), rank)
    mine, returned = fsdp_copies.all_gather_copy_in(inputs, out, sizes, sum(sizes), rank)
    assert torch.equal(out, expected_out) and torch.equal(mine, expected_mine)
    assert mine.data_ptr() == out.data_ptr() + rank * sum(sizes) * out.element_size() and returned is out


@pytest.mark.parametrize("out_layout", ["rows", "non-contiguous"])
def test_split_with_sizes_copy_matches_torch(out_layout):
    sizes, world = [3, 5, 2], 2
    gathered = torch.randn(world, sum(sizes))
    bases = [torch.zeros(world, n) if out_layout == "rows" else torch.zeros(n, world).t() for n in sizes]
    expected = [torch.zeros(world, n) for n in sizes]
    torch.split_with_sizes_copy(gathered, sizes, dim=1, out=expected)
    fsdp_copies.split_with_sizes_copy(gathered, sizes, 1, out=bases)
    assert all(torch.equal(got, want) for got, want in zip(bases, expected))


@pytest.mark.parametrize("shapes", [[(4, 3), (6,), (2, 5)], [(5, 3), (4,)]], ids=["even", "padded"])
def test_chunk_cat_matches_torch(shapes):
    world = 2
    tensors = [torch.randn(shape) for shape in shapes]
    total = sum(-(-t.size(0) // world) * t[0].numel() for t in tensors) * world
    expected, out = torch.full((world, total // world), 7.0), torch.full((world, total // world), 7.0)
    torch._chunk_cat(tensors, 0, world, out=expected)
    fsdp_copies.chunk_cat(tensors, 0, world, out=out)
    assert torch.equal(out, expected)  # the padded case falls back to torch's, zero padding included


def test_config_refuses_unknown_and_cpu():
    with pytest.raises(ValueError, match=r"parallelism\.fsdp_copies must be one of"):
        check_fsdp_options(ParallelismSection(fsdp_copies="dma"), "cuda")
    with pytest.raises(ValueError, match=r"parallelism\.fsdp_copies=copy-engine needs CUDA devices, not cpu"):
        check_fsdp_options(ParallelismSection(fsdp_copies="copy-engine"), "cpu")


def train_two_steps(copies: str) -> dict[str, torch.Tensor]:
    """Two SGD steps of a sharded tiny Bamba from a fixed seed; the full parameters after them."""
    torch.manual_seed(0)
    config = BambaConfig.from_preset("tiny", n_layers=2, attn_layer_indices=(1,))
    with torch.device("meta"):
        model = Bamba(config)
    cfg = ParallelismSection(reshard_after_forward="always")
    apply_parallelism(model, build_mesh(cfg, torch.device("cpu")), cfg)
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, foreach=False)
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(dist.get_rank()))
    torch_kernels_raise = [mock.patch.object(torch, name, side_effect=AssertionError(f"torch's {name} ran"))
                           for name in ("_foreach_copy_", "split_with_sizes_copy", "_chunk_cat")]
    if copies == "copy-engine":
        fsdp_copies.use_copy_engines("CPU")
        for patch in torch_kernels_raise:  # every copy must come through ours
            patch.start()
    try:
        for _ in range(2):
            model(ids, labels=ids).backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        mock.patch.stopall()
        fsdp_copies.use_torch_kernels("CPU")
    return {name: param.full_tensor() for name, param in model.named_parameters()}


def same_training_worker(rank: int, world_size: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        expected = train_two_steps("kernel")
        got = train_two_steps("copy-engine")
        assert expected.keys() == got.keys()
        for name in expected:
            assert torch.equal(got[name], expected[name]), name
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_fsdp_trains_to_the_same_bits_through_our_copies():
    mp.spawn(same_training_worker, args=(2, free_port()), nprocs=2, join=True)
