"""The chunked SSD scan and the causal conv against plainly written step-by-step versions."""

import pytest
import torch
import torch.nn.functional as F

from fms_bamba.model.ssd import causal_conv1d, ssd_chunked_scan


def recurrence(x, dt, A, B, C, doc_ids=None):
    """h[t] = exp(dt[t] A) h[t-1] + dt[t] x[t] B[t]^T; y[t] = h[t] C[t]; h = 0 at a new document."""
    batch, seq_len, n_heads, head_dim = x.shape
    B = B.repeat_interleave(n_heads // B.shape[2], dim=2)
    C = C.repeat_interleave(n_heads // C.shape[2], dim=2)
    state = x.new_zeros(batch, n_heads, head_dim, B.shape[-1])
    ys = []
    for t in range(seq_len):
        if doc_ids is not None and t > 0:
            state = state * (doc_ids[:, t] == doc_ids[:, t - 1])[:, None, None, None]
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]
        state = state * decay + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]))
    return torch.stack(ys, dim=1)


def random_inputs(seq_len, n_groups=1, dtype=torch.float64, batch=2, n_heads=4, head_dim=3, d_state=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq_len, n_heads, head_dim, generator=gen, dtype=dtype)
    dt = F.softplus(torch.randn(batch, seq_len, n_heads, generator=gen, dtype=dtype) - 1)
    A = -torch.rand(n_heads, generator=gen, dtype=dtype) * 4 - 0.1
    B = torch.randn(batch, seq_len, n_groups, d_state, generator=gen, dtype=dtype)
    C = torch.randn(batch, seq_len, n_groups, d_state, generator=gen, dtype=dtype)
    return [t.requires_grad_() for t in (x, dt, A, B, C)]


def random_doc_ids(batch, seq_len, seed=0):
    """Packed-document ids 0, 1, 2, ... per row, with documents of random lengths."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.rand(batch, seq_len, generator=gen) < 0.15
    starts[:, 0] = False
    return starts.long().cumsum(dim=1)


def outputs_and_grads(fn, inputs, seed=1):
    y = fn(*inputs)
    weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    grads = torch.autograd.grad((y * weight).sum(), inputs)
    return y, grads


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 16])
@pytest.mark.parametrize("seq_len", [1, 13, 32, 45])
def test_chunked_scan_matches_recurrence_float64(chunk_size, seq_len):
    inputs = random_inputs(seq_len, n_groups=2)
    y_ref, grads_ref = outputs_and_grads(recurrence, inputs)
    y, grads = outputs_and_grads(lambda *t: ssd_chunked_scan(*t, chunk_size=chunk_size), inputs)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    for name, grad, grad_ref in zip("x dt A B C".split(), grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, rtol=1e-9, atol=1e-9, msg=f"d{name}")


@pytest.mark.parametrize("chunk_size", [4, 7, 16])
def test_chunked_scan_doc_masking_matches_recurrence_with_resets(chunk_size):
    seq_len = 50
    inputs = random_inputs(seq_len, batch=3)
    doc_ids = random_doc_ids(3, seq_len)
    assert (doc_ids[:, -1] > 1).all()  # several documents per row, some crossing chunk edges
    y_ref, grads_ref = outputs_and_grads(lambda *t: recurrence(*t, doc_ids=doc_ids), inputs)
    y, grads = outputs_and_grads(lambda *t: ssd_chunked_scan(*t, chunk_size=chunk_size, doc_ids=doc_ids), inputs)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    for grad, grad_ref in zip(grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, rtol=1e-9, atol=1e-9)


def test_chunked_scan_doc_masking_equals_each_document_alone():
    lengths = [9, 1, 20, 12]
    x, dt, A, B, C = (t.detach() for t in random_inputs(sum(lengths), batch=1))
    doc_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    packed = ssd_chunked_scan(x, dt, A, B, C, chunk_size=8, doc_ids=doc_ids)
    start = 0
    for length in lengths:
        piece = slice(start, start + length)
        alone = ssd_chunked_scan(x[:, piece], dt[:, piece], A, B[:, piece], C[:, piece], chunk_size=8)
        torch.testing.assert_close(packed[:, piece], alone, rtol=1e-12, atol=1e-12)
        start += length


def test_chunked_scan_float32_accuracy_at_bamba_like_scales():
    # long sequence, strong decays: the fp32 chunked path stays close to the fp64 recurrence
    x, dt, A, B, C = (t.detach() for t in random_inputs(300, batch=1, d_state=16))
    y = ssd_chunked_scan(*(t.float() for t in (x, dt, A, B, C)), chunk_size=64)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), recurrence(x, dt, A, B, C), rtol=1e-4, atol=1e-4)


def conv_loop(x, weight, bias, doc_ids=None):
    batch, seq_len, channels = x.shape
    out = torch.zeros_like(x) + bias
    for t in range(seq_len):
        for k in range(weight.shape[1]):
            source = t - (weight.shape[1] - 1) + k
            if source < 0:
                continue
            visible = torch.ones(batch, 1, dtype=x.dtype) if doc_ids is None else (doc_ids[:, source] == doc_ids[:, t])[:, None].to(x.dtype)
            out[:, t] += visible * x[:, source] * weight[:, k]
    return out


@pytest.mark.parametrize("masked", [False, True])
def test_causal_conv1d_matches_loop_and_torch_conv(masked):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 30, 6, generator=gen, dtype=torch.float64)
    weight = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    bias = torch.randn(6, generator=gen, dtype=torch.float64)
    doc_ids = random_doc_ids(3, 30) if masked else None
    out = causal_conv1d(x, weight, bias, doc_ids)
    torch.testing.assert_close(out, conv_loop(x, weight, bias, doc_ids))
    if not masked:  # and torch's depthwise conv with left padding
        expected = F.conv1d(x.transpose(1, 2), weight[:, None], bias, padding=3, groups=6)[..., :30].transpose(1, 2)
        torch.testing.assert_close(out, expected)
