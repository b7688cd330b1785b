"""training.float8: fp8 matmuls against an explicit dequantised product and float64, the model's
conversion, and the trainer with it (CPU: torch._scaled_mm runs there too)."""

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from fms_bamba.checkpoint import CHECKPOINTS_FOLDER, checkpoint_dir_name
from fms_bamba.config import ConfigError, load_job_config
from fms_bamba.model import Bamba, BambaConfig
from fms_bamba.model.float8 import (FORWARD_DTYPE, GRADIENT_DTYPE, Float8Linear, Float8Matmul, convert_to_float8,
                                    to_float8)
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


def dequantised(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    t8, inverse = to_float8(t, dtype)
    return t8.double() * inverse.double()


def test_float8_matmul_is_the_product_of_its_fp8_operands():
    torch.manual_seed(0)
    x = torch.randn(64, 128, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(96, 128) * 0.05).to(torch.bfloat16).requires_grad_()
    dy = (torch.randn(64, 96) * 1e-3).to(torch.bfloat16)
    out = Float8Matmul.apply(x, w)
    out.backward(dy)
    assert out.dtype == x.grad.dtype == w.grad.dtype == torch.bfloat16
    x8, w8, g8 = dequantised(x, FORWARD_DTYPE), dequantised(w, FORWARD_DTYPE), dequantised(dy, GRADIENT_DTYPE)
    # Each result is the exact product of the scaled fp8 operands, rounded once to bf16.
    for got, expected in ((out, x8 @ w8.t()), (x.grad, g8 @ w8), (w.grad, g8.t() @ x8)):
        assert torch.allclose(got.double(), expected, rtol=2 ** -8, atol=expected.abs().max().item() * 1e-6)
    # Against float64 of the bf16 inputs: fp8's error (a few percent), far above bf16's.
    exact = (x.double() @ w.double().t(), dy.double() @ w.double(), dy.double().t() @ x.double())
    errors = [((got.double() - ref).norm() / ref.norm()).item() for got, ref in zip((out, x.grad, w.grad), exact)]
    assert 0.01 < errors[0] < 0.06 and all(0.02 < e < 0.1 for e in errors[1:]), errors


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
    for float8 in (False, True):
        run_dir = tmp_path / f"float8-{float8}"
        train(load_job_config(None, tiny_overrides(run_dir, corpus, **{"training.float8": float8})))
        runs[float8] = read_metrics(run_dir)
    losses = {k: [r["loss"] for r in v] for k, v in runs.items()}
    assert losses[True][-1] < losses[True][0] - 1.0
    assert losses[True] != losses[False]
    assert max(abs(a - b) / b for a, b in zip(losses[True], losses[False])) < 0.02
    # The same checkpoint layout: every tensor under the same key, shape and dtype.
    layouts = []
    for float8 in (False, True):
        checkpoint = tmp_path / f"float8-{float8}" / CHECKPOINTS_FOLDER / checkpoint_dir_name(30)
        metadata = FileSystemReader(checkpoint).read_metadata()
        layouts.append({key: (tuple(item.size), item.properties.dtype)
                        for key, item in metadata.state_dict_metadata.items() if hasattr(item, "size")})
    assert layouts[0] == layouts[1] and any(key.endswith("mlp.gate_proj.weight") for key in layouts[0])


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
    and gathered again for backward: FSDP2 and per-param give the same bits."""
    runs = run_both_shardings(tmp_path, corpus, "float8", {
        "training.float8": True, "training.steps": 6, "metrics.log_interval": 2, "checkpoint.interval": 6,
        "parallelism.reshard_after_forward": "always"})
    fsdp2, per_param = (read_metrics(runs[s]) for s in ("fsdp2", "per-param"))
    assert [(r["loss"], r["grad_norm"]) for r in per_param] == [(r["loss"], r["grad_norm"]) for r in fsdp2]
    assert fsdp2[-1]["loss"] < fsdp2[0]["loss"]
    assert_same_checkpoint(*(runs[s] / CHECKPOINTS_FOLDER / checkpoint_dir_name(6) for s in ("fsdp2", "per-param")))
