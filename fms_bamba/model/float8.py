"""Float8 training of linear layers: each matmul of a Linear's forward and backward runs in fp8
through `torch._scaled_mm`, scaled as one of torchtitan's float8 recipes (`training.float8_scaling`).

"tensorwise" (the default): one scale per tensor. Inputs and weights are cast to e4m3 (more
mantissa), gradients to e5m2 (more range). Each tensor is scaled so that its largest magnitude maps
to the format's largest finite value, and the matmul multiplies the two inverse scales back in
before writing bf16. The weights stay bf16 (or fp32) parameters: only the matmuls change, so
checkpoints, sharding and export are as without it.

"rowwise": one fp32 scale per row of each matmul operand along the dim it reduces over, so one
outlier token or channel coarsens only its own row instead of the whole tensor. The range then
lives in the scales, so gradients are e4m3 too (a mantissa bit more than e5m2). It costs more
casts: backward reduces over other dims than forward does, so x is cast twice in forward (per row
for the forward matmul, per column to save for the weight gradient), the weight per column and the
gradient both ways in backward; and the matmul applies a vector of scales, not one number.

Either is coarser than bf16, and by design: e4m3 keeps 3 mantissa bits, so each tensorwise
matmul's result is off by ~4% (relative RMS) where bf16's is off by ~0.2%, and a run's loss curve
strays further from the bf16 one than bf16's does from float32 (docs/performance.md has both
measured, for both scalings).

The forward saves the input in fp8 (half of bf16) and the weight as is; backward casts the weight
again, transposed, so no fp8 copy of a gathered weight outlives its forward."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FORWARD_DTYPE = torch.float8_e4m3fn
GRADIENT_DTYPE = torch.float8_e5m2  # tensorwise only; rowwise casts gradients to FORWARD_DTYPE
SCALINGS = ("tensorwise", "rowwise")
# The Linears made fp8: the MLP's and Mamba-2's in_proj, about 88% of the linear layers' FLOPs
# in a Bamba-9B Mamba-2 block. The rest stay bf16: the LM head (its loss is fused with it,
# docs/model.md), Mamba-2's out_proj (mamba-ssm's fused kernel applies it on the CUDA path), and
# attention's projections, which at Bamba-9B's sizes ran no faster in fp8 (k and v slower;
# benchmarks/float8_check.py).
CONVERTED = ("gate_proj", "up_proj", "down_proj", "in_proj")


def to_float8(t: torch.Tensor, dtype: torch.dtype, dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """t -> (t * scale in `dtype`, 1 / scale in fp32), scale = fp8 max / amax(|t|): one scale for the
    whole tensor (0-dim) when `dim` is None, else one per slice along `dim` (amax over `dim`, kept
    as a dim of size 1: [M, K] with dim=1 gives [M, 1] scales)."""
    largest = torch.finfo(dtype).max
    amax = t.abs().amax() if dim is None else t.abs().amax(dim, keepdim=True)
    scale = largest / amax.float().clamp(min=1e-12)  # all zeros: any scale gives zeros
    return (t.float() * scale).clamp(-largest, largest).to(dtype), scale.reciprocal()


def column_major(t: torch.Tensor) -> torch.Tensor:
    """The same matrix stored column by column, as `_scaled_mm` needs its second operand."""
    return t.t().contiguous().t()


class Float8Matmul(torch.autograd.Function):
    """x [M, K] @ weight[N, K]^T -> [M, N] in x's dtype; all three matmuls in fp8, scaled as
    `scaling` (one of SCALINGS). Rowwise scales each matmul's operands along the dim it reduces
    over, per row of the first and per column of the second (the scale shapes in the comments);
    tensorwise's scales are 0-dim (dims None), and a 0-dim tensor's .t() is itself."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, scaling: str = "tensorwise") -> torch.Tensor:
        ctx.rowwise = rowwise = scaling == "rowwise"
        by_row, by_column = (1, 0) if rowwise else (None, None)
        x8, x_inv = to_float8(x, FORWARD_DTYPE, by_row)  # row-major [M, K]; [M, 1]
        w8, w_inv = to_float8(weight, FORWARD_DTYPE, by_row)  # [N, K] row-major = [K, N] column-major; [N, 1]
        # The weight gradient reduces over M, so rowwise saves x scaled per column ([1, K]), in fp8 all the same.
        saved = to_float8(x, FORWARD_DTYPE, by_column) if rowwise else (x8, x_inv)
        ctx.save_for_backward(*saved, weight)
        return torch._scaled_mm(x8, w8.t(), scale_a=x_inv, scale_b=w_inv.t(), out_dtype=x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        x8, x_inv, weight = ctx.saved_tensors
        by_row, by_column = (1, 0) if ctx.rowwise else (None, None)
        grad_dtype = FORWARD_DTYPE if ctx.rowwise else GRADIENT_DTYPE
        g8, g_inv = to_float8(grad, grad_dtype, by_row)  # [M, N]; [M, 1]
        w8, w_inv = to_float8(weight, FORWARD_DTYPE, by_column)  # [N, K]; [1, K]
        grad_x = torch._scaled_mm(g8, column_major(w8), scale_a=g_inv, scale_b=w_inv,
                                  out_dtype=grad.dtype)  # [M, N] @ [N, K]
        # The weight gradient reduces over M: rowwise scales grad^T per row (scale_a must be a
        # contiguous [N, 1], which the transpose of grad's [1, N] column scales is not).
        gt8, gt_inv = to_float8(grad.t(), grad_dtype, by_row) if ctx.rowwise else (g8.t(), g_inv)  # [N, M]; [N, 1]
        grad_w = torch._scaled_mm(gt8.contiguous(), column_major(x8), scale_a=gt_inv, scale_b=x_inv,
                                  out_dtype=weight.dtype)  # [N, M] @ [M, K]
        return grad_x, grad_w, None


class Float8Linear(nn.Linear):
    """nn.Linear (no bias) whose matmuls run in fp8 while gradients are recorded (training steps);
    evaluation and generation keep the plain matmul, so their outputs are the bf16 model's."""

    scaling = "tensorwise"  # one of SCALINGS; convert_to_float8 sets it per module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return F.linear(x, self.weight)
        out = Float8Matmul.apply(x.reshape(-1, x.shape[-1]), self.weight, self.scaling)
        return out.view(*x.shape[:-1], out.shape[-1])


def convert_to_float8(model: nn.Module, scaling: str = "tensorwise") -> list[str]:
    """Make every bias-free nn.Linear named in CONVERTED a Float8Linear scaled as `scaling` (one of
    SCALINGS), in place (same parameters, same names); returns the converted modules' names."""
    if scaling not in SCALINGS:
        raise ValueError(f"float8 scaling must be one of {SCALINGS}, got {scaling!r}")
    converted = []
    for name, module in model.named_modules():
        if type(module) is nn.Linear and module.bias is None and name.rsplit(".", 1)[-1] in CONVERTED:
            module.__class__ = Float8Linear
            module.scaling = scaling
            converted.append(name)
    return converted
