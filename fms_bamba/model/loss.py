"""Cross-entropy of the LM head, fused with its matmul: logits = h @ W^T exist one chunk of tokens
at a time, and each chunk's gradients w.r.t. h and W are taken while its logits are at hand.

Backward through `F.cross_entropy(F.linear(h, W))` keeps the full logits ([tokens, 128k] in fp32
is 4 GiB per 8k tokens) or, chunked with recomputation, runs the head's matmul four times. Here
forward does all three matmuls the head needs (logits, dL/dh, dL/dW) and backward only scales
them by the incoming gradient."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def summed_loss_and_logit_grad(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, V] (bf16 or wider), labels [T] -> (sum of fp32 (or wider) CE over labels != -100,
    d(sum)/d(logits) [T, V] in the logits' dtype). Elementwise only: torch.compile fuses it."""
    dtype, logits = logits.dtype, logits.to(torch.promote_types(logits.dtype, torch.float32))
    valid = labels != IGNORE_INDEX  # [T]
    target = labels.clamp(min=0)[:, None]  # [T, 1]; ignored rows are zeroed below
    log_z = torch.logsumexp(logits, dim=-1, keepdim=True)  # [T, 1]
    loss = ((log_z - logits.gather(1, target)).squeeze(1) * valid).sum()
    # d CE / d logits = softmax(logits) - onehot(label)
    grad = torch.exp(logits - log_z).scatter_add(1, target, torch.full_like(log_z, -1.0))
    return loss, (grad * valid[:, None]).to(dtype)


def _matmul_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, accumulate: bool) -> None:
    """out (+)= a @ b, with out possibly wider than bf16 a and b: the product is rounded once, to
    out's dtype (cuBLAS's fp32-output GEMM; on CPU, only tests use bf16: upcast)."""
    if out.dtype != a.dtype and not a.is_cuda:
        a, b = a.to(out.dtype), b.to(out.dtype)
    out_dtype = {"out_dtype": out.dtype} if out.dtype != a.dtype else {}
    if accumulate:
        torch.addmm(out, a, b, **out_dtype, out=out)
    else:
        torch.mm(a, b, **out_dtype, out=out)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int,
                loss_and_grad: Callable) -> torch.Tensor:
        # h [T, D], weight [V, D], labels [T]. Gradients are kept in fp32 until backward scales them,
        # so they are rounded to bf16 once, as autograd through full logits would round them.
        wide = torch.promote_types(h.dtype, torch.float32)
        need_h, need_w = ctx.needs_input_grad[:2]
        grad_h = torch.empty_like(h, dtype=wide) if need_h else None  # [T, D], every row written below
        grad_w = torch.zeros_like(weight, dtype=wide) if need_w else None  # [V, D]
        total = torch.zeros((), dtype=wide, device=h.device)
        for start in range(0, h.shape[0], chunk_tokens):
            h_chunk, labels_chunk = h[start : start + chunk_tokens], labels[start : start + chunk_tokens]
            logits = h_chunk @ weight.T  # [t, V] in the compute dtype
            loss, grad_logits = loss_and_grad(logits, labels_chunk)
            total += loss
            if need_h:
                _matmul_into(grad_h[start : start + chunk_tokens], grad_logits, weight, accumulate=False)  # [t, D]
            if need_w:
                _matmul_into(grad_w, grad_logits.T, h_chunk, accumulate=True)  # [V, D]
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = h.dtype, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        return (None if grad_h is None else (grad_h * grad_total).to(h_dtype),
                None if grad_w is None else (grad_w * grad_total).to(w_dtype), None, None, None)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, chunk_tokens: int,
                         loss_and_grad: Callable = summed_loss_and_logit_grad) -> torch.Tensor:
    """Sum over tokens of fp32 CE(h @ weight^T, labels), ignoring labels == -100. h [T, D],
    weight [V, D], labels [T]. No more than chunk_tokens x V logits exist at once."""
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, labels, chunk_tokens, loss_and_grad)
    wide = torch.promote_types(h.dtype, torch.float32)  # no gradient wanted (evaluation): the loss alone
    return sum(F.cross_entropy((h[i : i + chunk_tokens] @ weight.T).to(wide), labels[i : i + chunk_tokens],
                               ignore_index=IGNORE_INDEX, reduction="sum")
               for i in range(0, h.shape[0], chunk_tokens))
