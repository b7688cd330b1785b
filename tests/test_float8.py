"""training.float8: fp8 matmuls against an explicit dequantised product and float64, the model's
conversion, and the trainer with it (CPU: torch._scaled_mm runs there too)."""

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from fms_bamba.checkpoint import CHECKPOINTS_FOLDER, checkpoint_dir_name
from fms_bamba.config import ConfigError, load_job_config
from fms_bamba.model import Bamba, BambaConfig
from fms_bamba.model.float8 import (FORWARD_DTYPE, GRADIENT_DTYPE, SCALINGS, Float8Linear, Float8Matmul,
                                    convert_to_float8, to_float8)
from fms_bamba.parallel import DistInfo
from fms_bamba.train import check_job, train
from test_train import (assert_same_checkpoint, corpus, read_metrics, run_both_shardings,  # noqa: F401 (a fixture)
                        tiny_overrides)

def test_to_float8_maps_the_largest_magnitude_to_the_formats_largest_value():
    t = torch.tensor([[0.5, -3.0], [1e-3, 0.0]], dtype=torch.bfloat16)
    for dtype in (FORWARD_DTYPE, GRADIENT_DTYPE):
        t8, inverse = to_float8(t, dtype)
        assert t8.dtype == dtype and t8[0, 1].float() == -torch.finfo(dtype).max
        assert torch.allclose(t8.float() * inverse, t.float(), rtol=0.13, atol=0)  # within fp8's rounding
    zeros, inverse = to_float8(torch.zeros(4, 4), FORWARD_DTYPE)
    assert not zeros.float().any() and torch.isfinite(inverse)
    # Along a dim: each row's (or column's) own largest magnitude, one scale per row (column).
    largest = torch.finfo(FORWARD_DTYPE).max
    rows, inverse = to_float8(t, FORWARD_DTYPE, dim=1)
    assert inverse.shape == (2, 1) and rows.float().abs().amax(dim=1).tolist() == [largest, largest]
    columns, inverse = to_float8(t, FORWARD_DTYPE, dim=0)
    assert inverse.shape == (1, 2) and columns.float().abs().amax(dim=0).tolist() == [largest, largest]


def dequantised(t: torch.Tensor, dtype: torch.dtype, dim: int | None = None) -> torch.Tensor:
    t8, inverse = to_float8(t, dtype, dim)
    return t8.double() * inverse.double()


@pytest.mark.parametrize("scaling", SCALINGS)
def test_float8_matmul_is_the_product_of_its_fp8_operands(scaling):
    torch.manual_seed(0)
    x = torch.randn(64, 128, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(96, 128) * 0.05).to(torch.bfloat16).requires_grad_()
    dy = (torch.randn(64, 96) * 1e-3).to(torch.bfloat16)
    out = Float8Matmul.apply(x, w, scaling)
    out.backward(dy)
    assert out.dtype == x.grad.dtype == w.grad.dtype == torch.bfloat16
    # Tensorwise: one scale per operand, gradients e5m2. Rowwise: each operand scaled per slice along
    # the dim its matmul reduces over (x and w per row in forward, w per column for the input
    # gradient, dy and x per column for the weight gradient), all e4m3.
    rowwise = scaling == "rowwise"
    by_row, by_column = (1, 0) if rowwise else (None, None)
    grad_dtype = FORWARD_DTYPE if rowwise else GRADIENT_DTYPE
    expected = (dequantised(x, FORWARD_DTYPE, by_row) @ dequantised(w, FORWARD_DTYPE, by_row).t(),
                dequantised(dy, grad_dtype, by_row) @ dequantised(w, FORWARD_DTYPE, by_column),
                dequantised(dy, grad_dtype, by_column).t() @ dequantised(x, FORWARD_DTYPE, by_column))
    # Each result is the exact product of the scaled fp8 operands, rounded once to bf16.
    for got, product in zip((out, x.grad, w.grad), expected):
        assert torch.allclose(got.double(), product, rtol=2 ** -8, atol=product.abs().max().item() * 1e-6)
    # Against float64 of the bf16 inputs: fp8's error (a few percent), far above bf16's; rowwise's
    # gradients, in e4m3, closer than tensorwise's e5m2.
    exact = (x.double() @ w.double().t(), dy.double() @ w.double(), dy.double().t() @ x.double())
    errors = [((got.double() - ref).norm() / ref.norm()).item() for got, ref in zip((out, x.grad, w.grad), exact)]
    assert 0.01 < errors[0] < 0.06 and all(0.02 < e < 0.1 for e in errors[1:]), errors
    assert not rowwise or max(errors) < 0.05, errors


def test_rowwise_keeps_ordinary_rows_accurate_beside_outlier_rows():
    """A few rows 1e5 times the rest: one scale for the tensor pushes the ordinary rows below e4m3's
    smallest normal (about 3e4 times below its largest), so their outputs lose most bits; per-row
    scales leave each row its own range."""
    torch.manual_seed(0)
    x = torch.randn(64, 128)
    x[:4] *= 1e5
    x = x.to(torch.bfloat16)
    w = (torch.randn(96, 128) * 0.05).to(torch.bfloat16)
    ordinary = x[4:]
    exact = ordinary.double() @ w.double().t()
    errors = {}
    for scaling in SCALINGS:
        out = Float8Matmul.apply(x, w, scaling)[4:]
        errors[scaling] = ((out.double() - exact).norm() / exact.norm()).item()
    assert errors["rowwise"] < 0.05 and errors["tensorwise"] > 5 * errors["rowwise"], errors


def test_conversion_keeps_parameters_and_evaluation_and_approximates_training():
    config = BambaConfig.from_preset("tiny", max_seq_len=32)
    torch.manual_seed(0)
    plain = Bamba(config)
    plain.init_weights()
    converted = Bamba(config)
    converted.load_state_dict(plain.state_dict())
    names = convert_to_float8(converted)
    assert names and all(name.rsplit(".", 1)[-1] in ("gate_proj", "up_proj", "down_proj", "in_proj") for name in names)
    # Every MLP and every Mamba-2 in_proj, nothing else (the LM head, out_proj, attention stay).
    expected = sum(3 + (not config.is_attention_layer(i)) for i in range(config.n_layers))
    assert len(names) == expected
    assert all(isinstance(converted.get_submodule(name), Float8Linear) for name in names)
    assert type(converted.output) is torch.nn.Linear
    assert list(converted.state_dict()) == list(plain.state_dict())
    ids = torch.randint(0, config.vocab_size, (2, 32))
    with torch.no_grad():  # evaluation and generation: the plain matmuls, so the same bits
        assert torch.equal(converted(ids, labels=ids), plain(ids, labels=ids))
    losses = []
    for model in (plain, converted):
        loss = model(ids, labels=ids)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] != losses[1] and abs(losses[0] - losses[1]) < 0.02 * losses[0]
    # fp8's noise reaches every gradient (~15% relative here), but not its direction.
    grads = [torch.cat([p.grad.flatten() for p in model.parameters()]) for model in (plain, converted)]
    assert torch.nn.functional.cosine_similarity(*grads, dim=0) > 0.98


def test_trainer_with_float8_trains_and_checkpoints_the_same_tensors(corpus, tmp_path):  # noqa: F811
    runs = {}
    for name, overrides in (("off", {}), ("tensorwise", {"training.float8": True}),
                            ("rowwise", {"training.float8": True, "training.float8_scaling": "rowwise"})):
        train(load_job_config(None, tiny_overrides(tmp_path / name, corpus, **overrides)))
        runs[name] = read_metrics(tmp_path / name)
    losses = {k: [r["loss"] for r in v] for k, v in runs.items()}
    for scaling in SCALINGS:
        assert losses[scaling][-1] < losses[scaling][0] - 1.0
        assert losses[scaling] != losses["off"]
        assert max(abs(a - b) / b for a, b in zip(losses[scaling], losses["off"])) < 0.02
    assert losses["rowwise"] != losses["tensorwise"]  # the scaling reaches the model's Linears
    # The same checkpoint layout: every tensor under the same key, shape and dtype.
    layouts = []
    for name in runs:
        checkpoint = tmp_path / name / CHECKPOINTS_FOLDER / checkpoint_dir_name(30)
        metadata = FileSystemReader(checkpoint).read_metadata()
        layouts.append({key: (tuple(item.size), item.properties.dtype)
                        for key, item in metadata.state_dict_metadata.items() if hasattr(item, "size")})
    assert layouts[0] == layouts[1] == layouts[2] and any(key.endswith("mlp.gate_proj.weight") for key in layouts[0])


def test_float8_scaling_must_be_known(corpus, tmp_path):  # noqa: F811
    cfg = load_job_config(None, tiny_overrides(tmp_path / "run", corpus, **{"training.float8_scaling": "per-row"}))
    with pytest.raises(ConfigError, match=r"training\.float8_scaling must be one of \('tensorwise', 'rowwise'\), "
                                          r"got 'per-row'"):
        check_job(cfg, DistInfo(rank=0, local_rank=0, world_size=1))


def test_float8_needs_an_fp8_capable_gpu(corpus, tmp_path, monkeypatch):  # noqa: F811
    cfg = load_job_config(None, tiny_overrides(tmp_path / "run", corpus, **{"training.float8": True}))
    monkeypatch.setattr("fms_bamba.train.pick_device", lambda cfg, info: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(ConfigError, match=r"training\.float8 needs fp8 matmuls .*NVIDIA A100 has \(8, 0\)"):
        check_job(cfg, DistInfo(rank=0, local_rank=0, world_size=1))


@pytest.mark.slow
def test_float8_under_both_shardings_with_weights_freed_between_forward_and_backward(corpus, tmp_path):  # noqa: F811
    """2 ranks, every block resharded after forward, so the weight that Float8Matmul saves is freed
    and gathered again for backward: FSDP2 and per-param give the same bits. (With bf16 masters'
    moments too, `optimizer.moments_dtype`, the other option that changes only the arithmetic.)"""
    runs = run_both_shardings(tmp_path, corpus, "float8", {
        "training.float8": True, "training.steps": 6, "metrics.log_interval": 2, "checkpoint.interval": 6,
        "parallelism.reshard_after_forward": "always", "optimizer.master_weights": True,
        "optimizer.moments_dtype": "bfloat16"})
    fsdp2, per_param = (read_metrics(runs[s]) for s in ("fsdp2", "per-param"))
    assert [(r["loss"], r["grad_norm"]) for r in per_param] == [(r["loss"], r["grad_norm"]) for r in fsdp2]
    assert fsdp2[-1]["loss"] < fsdp2[0]["loss"]
    assert_same_checkpoint(*(runs[s] / CHECKPOINTS_FOLDER / checkpoint_dir_name(6) for s in ("fsdp2", "per-param")))
