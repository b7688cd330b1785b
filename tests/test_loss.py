"""The LM head's fused, chunked cross-entropy against F.cross_entropy on full logits."""

import pytest
import torch
import torch.nn.functional as F

from fms_bamba.model.loss import linear_cross_entropy, summed_loss_and_logit_grad


def reference(h, weight, labels):
    return F.cross_entropy(h @ weight.T, labels, ignore_index=-100, reduction="sum")


def grads(fn, h, weight, labels, scale):
    h, weight = h.detach().requires_grad_(), weight.detach().requires_grad_()
    loss = fn(h, weight, labels)
    (loss * scale).backward()  # backward must scale by the incoming gradient
    return loss.detach(), h.grad, weight.grad


@pytest.mark.parametrize("chunk_tokens", [1, 8, 37, 64])  # one row each, ragged last chunk, exact, one chunk
def test_matches_full_logits_float64(chunk_tokens):
    torch.manual_seed(0)
    h, weight = torch.randn(37, 16, dtype=torch.float64), torch.randn(50, 16, dtype=torch.float64)
    labels = torch.randint(0, 50, (37,))
    labels[[0, 10, 36]] = -100
    expected = grads(reference, h, weight, labels, scale=2.5)
    got = grads(lambda *a: linear_cross_entropy(*a, chunk_tokens=chunk_tokens), h, weight, labels, scale=2.5)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    assert got[1][[0, 10, 36]].abs().max() == 0  # ignored tokens get no gradient


def test_bf16_as_accurate_as_autograd_through_full_logits():
    """bf16 h and weight (as under FSDP's mixed precision): the loss is fp32, gradients come back
    in bf16, and each is as close to a float64 computation from the same bf16 values as autograd
    through the full bf16 logits cast to fp32 (what the unfused head does)."""
    torch.manual_seed(0)
    h, weight = torch.randn(256, 32).bfloat16(), (torch.randn(300, 32) * 0.2).bfloat16()
    labels = torch.randint(0, 300, (256,))
    fused = grads(lambda *a: linear_cross_entropy(*a, chunk_tokens=64), h, weight, labels, scale=1.0)
    unfused = grads(lambda h, w, y: F.cross_entropy((h @ w.T).float(), y, reduction="sum"), h, weight, labels, scale=1.0)
    exact = grads(reference, h.double(), weight.double(), labels, scale=1.0)
    assert fused[0].dtype == torch.float32 and fused[1].dtype == fused[2].dtype == torch.bfloat16
    for f, u, e in zip(fused, unfused, exact):
        fused_error, unfused_error = (f.double() - e).norm() / e.norm(), (u.double() - e).norm() / e.norm()
        assert fused_error <= 1.05 * unfused_error + 1e-6, (fused_error, unfused_error)


def test_without_grad_only_the_loss_is_computed(monkeypatch):
    """Evaluation runs under no_grad: the same loss, and none of the gradient matmuls."""
    from fms_bamba.model import loss

    h, weight, labels = torch.randn(9, 4, requires_grad=True), torch.randn(7, 4), torch.randint(0, 7, (9,))
    labels[2] = -100
    expected = linear_cross_entropy(h, weight, labels, chunk_tokens=4).detach()
    monkeypatch.setattr(loss, "_matmul_into", lambda *a, **k: pytest.fail("a gradient matmul ran under no_grad"))
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, weight, labels, chunk_tokens=4), expected)


def test_frozen_weight_gets_no_gradient():
    h, weight = torch.randn(9, 4, requires_grad=True), torch.randn(7, 4)
    linear_cross_entropy(h, weight, torch.randint(0, 7, (9,)), chunk_tokens=4).backward()
    assert h.grad is not None and weight.grad is None


def test_compiled_elementwise_part_matches_eager():
    torch.manual_seed(0)
    logits, labels = torch.randn(12, 40), torch.randint(0, 40, (12,))
    labels[3] = -100
    compiled = torch.compile(summed_loss_and_logit_grad)
    for e, g in zip(summed_loss_and_logit_grad(logits, labels), compiled(logits, labels)):
        torch.testing.assert_close(g, e)
