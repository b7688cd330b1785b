"""The Mamba-2 mixer after in_proj (conv + SSD scan + gated norm + out_proj) as a PyTorch custom op,
so that torch.compile traces a whole Mamba-2 block in one graph, with the kernel as one opaque node
forward and backward.

Two ops joined by `register_autograd`: `fms_bamba::split_conv1d_scan_fwd` returns the output and
what backward needs, `fms_bamba::split_conv1d_scan_bwd` the gradients. On CUDA they run mamba-ssm's
`MambaSplitConv1dScanCombinedFn.forward` / `.backward` (exactly what `mamba_split_conv1d_scan_combined`
runs), importing mamba-ssm on first use; on CPU, `ssd.split_conv1d_scan`, so that the op can be
tested without a GPU.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import torch
from torch import Tensor

from fms_bamba.model.kernels import mamba_split_conv1d_scan_fn
from fms_bamba.model.ssd import split_conv1d_scan


@torch.library.custom_op("fms_bamba::split_conv1d_scan_fwd", mutates_args=())
def split_conv1d_scan_fwd(
    zxbcdt: Tensor, conv_weight: Tensor, conv_bias: Tensor, dt_bias: Tensor, A: Tensor, D: Tensor,
    norm_weight: Tensor, out_proj_weight: Tensor, seq_idx: Tensor | None, chunk_size: int, n_groups: int, eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`ssd.split_conv1d_scan` (seq_idx: doc_ids, int32) -> out [b, s, hidden], y [b, s, h, p] (scan
    with D x, zxbcdt's dtype), rstd [g*b*s] (fp32, group-major) and the final SSM state [b, h, p, n]
    (fp32): the layouts of the CUDA kernel, whose y and rstd its backward reads."""
    out, y, rstd, state = split_conv1d_scan(
        zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, out_proj_weight, seq_idx, chunk_size, n_groups, eps
    )
    y = y.to(zxbcdt.dtype, memory_format=torch.contiguous_format)
    return out.contiguous(), y, rstd.flatten(0, -2).T.flatten(), state.float().contiguous()


@split_conv1d_scan_fwd.register_fake
def _(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, out_proj_weight, seq_idx, chunk_size, n_groups, eps):
    batch, seq_len, _ = zxbcdt.shape
    n_heads, d_inner = A.shape[0], norm_weight.shape[0]
    d_state = (conv_weight.shape[0] - d_inner) // (2 * n_groups)
    return (
        zxbcdt.new_empty(batch, seq_len, out_proj_weight.shape[0]),
        zxbcdt.new_empty(batch, seq_len, n_heads, d_inner // n_heads),
        zxbcdt.new_empty(n_groups * batch * seq_len, dtype=torch.float32),
        zxbcdt.new_empty(batch, n_heads, d_inner // n_heads, d_state, dtype=torch.float32),
    )


@torch.library.custom_op("fms_bamba::split_conv1d_scan_bwd", mutates_args=())
def split_conv1d_scan_bwd(
    dout: Tensor, zxbcdt: Tensor, conv_weight: Tensor, conv_bias: Tensor, dt_bias: Tensor, A: Tensor, D: Tensor,
    norm_weight: Tensor, out_proj_weight: Tensor, seq_idx: Tensor | None, y: Tensor, rstd: Tensor,
    chunk_size: int, n_groups: int, eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dout [b, s, hidden] -> the gradients of zxbcdt and the seven weights, each shaped and typed as
    its input. Here autograd through the forward recomputed (y and rstd are for the CUDA kernel), on a
    thread of its own: this runs below the autograd dispatch key, where ops are not recorded, and a
    new thread's dispatch state starts afresh."""
    inputs = (zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, out_proj_weight)

    def grads() -> tuple[Tensor, ...]:
        leaves = [t.detach().requires_grad_() for t in inputs]
        out = split_conv1d_scan(*leaves, seq_idx, chunk_size, n_groups, eps)[0]
        return torch.autograd.grad(out, leaves, dout)

    with ThreadPoolExecutor(max_workers=1) as thread:
        return tuple(grad.contiguous() for grad in thread.submit(grads).result())


@split_conv1d_scan_bwd.register_fake
def _(dout, zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, out_proj_weight, seq_idx, y, rstd,
      chunk_size, n_groups, eps):
    inputs = (zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, out_proj_weight)
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in inputs)


def setup_context(ctx, inputs, output):
    *tensors, seq_idx, ctx.chunk_size, ctx.n_groups, ctx.eps = inputs
    _, y, rstd, _ = output
    ctx.save_for_backward(*tensors, seq_idx, y, rstd)
    ctx.mark_non_differentiable(*output[1:])


def backward(ctx, dout, *non_differentiable):
    grads = split_conv1d_scan_bwd(dout, *ctx.saved_tensors, ctx.chunk_size, ctx.n_groups, ctx.eps)
    return *grads, None, None, None, None


split_conv1d_scan_fwd.register_autograd(backward, setup_context=setup_context)


class KernelCtx(SimpleNamespace):
    """Stands in for the autograd ctx that MambaSplitConv1dScanCombinedFn's forward fills and its
    backward reads."""

    def save_for_backward(self, *tensors: Tensor | None) -> None:
        self.saved_tensors = tensors


def kernel_settings(chunk_size: int, head_dim: int, n_groups: int, eps: float) -> dict:
    """The Function's forward keywords that its backward reads back from ctx, for Bamba's mixer."""
    return {"chunk_size": chunk_size, "headdim": head_dim, "ngroups": n_groups, "rmsnorm_eps": eps,
            "activation": "silu", "norm_before_gate": False, "dt_limit": (0.0, float("inf"))}


# The kernels call the Function's forward/backward through __wrapped__, i.e. without their torch.amp
# decorators, which only carry the autocast state from forward to backward on ctx (Bamba trains
# without autocast).
@split_conv1d_scan_fwd.register_kernel("cuda")
def _(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, out_proj_weight, seq_idx, chunk_size, n_groups, eps):
    ctx = KernelCtx()
    out, state = mamba_split_conv1d_scan_fn().forward.__wrapped__(
        ctx, zxbcdt, conv_weight, conv_bias, dt_bias, A, D, seq_idx=seq_idx, return_final_states=True,
        rmsnorm_weight=norm_weight, outproj_weight=out_proj_weight,
        **kernel_settings(chunk_size, norm_weight.shape[0] // A.shape[0], n_groups, eps),
    )
    y, rstd = ctx.saved_tensors[3], ctx.saved_tensors[10]  # saved as out_x and rstd
    batch, seq_len, _ = zxbcdt.shape
    if y.shape != (batch, seq_len, A.shape[0], norm_weight.shape[0] // A.shape[0]) or rstd.shape != (
        n_groups * batch * seq_len,
    ):  # the positions above are mamba-ssm 2.3's; a release that moved them must not pass silently
        raise RuntimeError(f"mamba-ssm's MambaSplitConv1dScanCombinedFn saved its tensors in another order than "
                           f"2.3's (out_x {tuple(y.shape)}, rstd {tuple(rstd.shape)}); install mamba-ssm 2.3")
    return out, y, rstd, state


@split_conv1d_scan_bwd.register_kernel("cuda")
def _(dout, zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, out_proj_weight, seq_idx, y, rstd,
      chunk_size, n_groups, eps):
    head_dim = norm_weight.shape[0] // A.shape[0]
    ctx = KernelCtx(return_final_states=False, **kernel_settings(chunk_size, head_dim, n_groups, eps))
    # the forward's saved tensors, in its order; None: initial_states, outproj_bias
    ctx.save_for_backward(
        zxbcdt, conv_weight, conv_bias, y, A, D, dt_bias, None, seq_idx, norm_weight, rstd, out_proj_weight, None
    )
    grads = mamba_split_conv1d_scan_fn().backward.__wrapped__(ctx, dout)
    inputs = (zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight, out_proj_weight)
    # the Function's gradients of those inputs (dt_bias's comes in fp32: cast, as autograd would)
    return tuple(grads[i].to(t.dtype, memory_format=torch.contiguous_format)
                 for i, t in zip((0, 1, 2, 3, 4, 5, 12, 14), inputs))
