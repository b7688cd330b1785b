"""Float8 training of linear layers: each matmul of a Linear's forward and backward runs in fp8
through `torch._scaled_mm`, with one scale per tensor (torchtitan's "tensorwise" float8 recipe).

Inputs and weights are cast to e4m3 (more mantissa), gradients to e5m2 (more range). Each tensor is
scaled so that its largest magnitude maps to the format's largest finite value, and the matmul
multiplies the two inverse scales back in before writing bf16. The weights stay bf16 (or fp32)
parameters: only the matmuls change, so checkpoints, sharding and export are as without it.

This is coarser than bf16, and by design: e4m3 keeps 3 mantissa bits, so each matmul's result is
off by ~4% (relative RMS) where bf16's is off by ~0.2%, and a run's loss curve strays further from
the bf16 one than bf16's does from float32 (docs/performance.md has both measured).

The forward saves the input in fp8 (half of bf16) and the weight as is; backward casts the weight
again, transposed, so no fp8 copy of a gathered weight outlives its forward."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FORWARD_DTYPE = torch.float8_e4m3fn
GRADIENT_DTYPE = torch.float8_e5m2
# The Linears made fp8: the MLP's and Mamba-2's in_proj, about 88% of the linear layers' FLOPs
# in a Bamba-9B Mamba-2 block. The rest stay bf16: the LM head (its loss is fused with it,
# docs/model.md), Mamba-2's out_proj (mamba-ssm's fused kernel applies it on the CUDA path), and
# attention's projections, which at Bamba-9B's sizes ran no faster in fp8 (k and v slower;
# benchmarks/float8_check.py).
CONVERTED = ("gate_proj", "up_proj", "down_proj", "in_proj")


def to_float8(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """t -> (t * scale in `dtype`, 1 / scale as a 0-dim fp32 tensor), scale = fp8 max / amax(|t|)."""
    largest = torch.finfo(dtype).max
    amax = t.abs().amax().float().clamp(min=1e-12)  # all zeros: any scale gives zeros
    scale = largest / amax
    return (t.float() * scale).clamp(-largest, largest).to(dtype), scale.reciprocal()


def column_major(t: torch.Tensor) -> torch.Tensor:
    """The same matrix stored column by column, as `_scaled_mm` needs its second operand."""
    return t.t().contiguous().t()


class Float8Matmul(torch.autograd.Function):
    """x [M, K] @ weight[N, K]^T -> [M, N] in x's dtype; all three matmuls in fp8."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x8, x_inv = to_float8(x, FORWARD_DTYPE)  # row-major [M, K]
        w8, w_inv = to_float8(weight, FORWARD_DTYPE)  # [N, K] row-major = [K, N] column-major
        ctx.save_for_backward(x8, x_inv, weight)
        return torch._scaled_mm(x8, w8.t(), scale_a=x_inv, scale_b=w_inv, out_dtype=x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x8, x_inv, weight = ctx.saved_tensors
        g8, g_inv = to_float8(grad, GRADIENT_DTYPE)  # [M, N]
        w8, w_inv = to_float8(weight, FORWARD_DTYPE)
        grad_x = torch._scaled_mm(g8, column_major(w8), scale_a=g_inv, scale_b=w_inv,
                                  out_dtype=grad.dtype)  # [M, N] @ [N, K]
        grad_w = torch._scaled_mm(g8.t().contiguous(), column_major(x8), scale_a=g_inv, scale_b=x_inv,
                                  out_dtype=weight.dtype)  # [N, M] @ [M, K]
        return grad_x, grad_w


class Float8Linear(nn.Linear):
    """nn.Linear (no bias) whose matmuls run in fp8 while gradients are recorded (training steps);
    evaluation and generation keep the plain matmul, so their outputs are the bf16 model's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return F.linear(x, self.weight)
        out = Float8Matmul.apply(x.reshape(-1, x.shape[-1]), self.weight)
        return out.view(*x.shape[:-1], out.shape[-1])


def convert_to_float8(model: nn.Module) -> list[str]:
    """Make every bias-free nn.Linear named in CONVERTED a Float8Linear, in place (same parameters,
    same names); returns the converted modules' names."""
    converted = []
    for name, module in model.named_modules():
        if type(module) is nn.Linear and module.bias is None and name.rsplit(".", 1)[-1] in CONVERTED:
            module.__class__ = Float8Linear
            converted.append(name)
    return converted
