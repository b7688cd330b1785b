"""Each Linear of a Bamba-9B block at the step's shapes (micro-batch 2 x 4096 tokens), in bf16 and in
fp8 (`fms_bamba.model.float8`, `training.float8`) scaled per tensor ("fp8") and per row ("fp8 row",
`training.float8_scaling=rowwise`): time of forward + backward, compiled as the trainer compiles a
block, and each result's error against float64 on the same bf16 inputs.

    python benchmarks/float8_check.py [--tokens 8192] [--iters 20]     # one sm89+ GPU

Errors are ||result - float64|| / ||float64|| for the output, the input gradient and the weight
gradient; the bf16 rows show the rounding that bf16 itself brings, for scale."""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from fms_bamba.model import BambaConfig
from fms_bamba.model.float8 import Float8Matmul
from model_kernels import relative_error, time_fwd_bwd  # this folder's


def relative_errors(matmul, x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor) -> list[float]:
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    y = matmul(x, w)
    y.backward(dy)
    x64, w64, dy64 = x.double(), w.double(), dy.double()
    exact = (x64 @ w64.t(), dy64 @ w64, dy64.t() @ x64)
    return [relative_error(got, ref) for got, ref in zip((y, x.grad, w.grad), exact)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    config = BambaConfig.from_preset("bamba-9b")
    d, head = config.hidden_size, config.head_dim
    shapes = {  # name: (in, out)
        "mlp gate / up": (d, config.mlp_hidden_size), "mlp down": (config.mlp_hidden_size, d),
        "mamba in_proj": (d, config.mamba_d_inner + config.mamba_conv_dim + config.mamba_n_heads),
        "attention q / o": (d, config.n_heads * head), "attention k / v": (d, config.n_kv_heads * head),
    }
    torch.manual_seed(0)
    print(f"{args.tokens} tokens; forward+backward ms (compiled), TFLOP/s, relative error of "
          "output / input grad / weight grad vs float64")
    for name, (n_in, n_out) in shapes.items():
        x = torch.randn(args.tokens, n_in, device="cuda", dtype=torch.bfloat16)
        w = (torch.randn(n_out, n_in, device="cuda") * n_in ** -0.5).to(torch.bfloat16)
        dy = (torch.randn(args.tokens, n_out, device="cuda") * 1e-3).to(torch.bfloat16)  # a loss gradient's scale
        flops = 6 * args.tokens * n_in * n_out
        for label, matmul in (("bf16", F.linear), ("fp8", Float8Matmul.apply),
                              ("fp8 row", lambda x, w: Float8Matmul.apply(x, w, "rowwise"))):
            compiled = torch.compile(matmul)
            xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
            ms = time_fwd_bwd(lambda: compiled(xg, wg).backward(dy), torch.device("cuda"), args.iters)
            errors = relative_errors(matmul, x, w, dy)
            print(f"{name:<16} {n_in:>6} -> {n_out:<6} {label:<7} {ms:7.3f} ms {flops / ms / 1e9:6.0f} TFLOP/s  "
                  + " / ".join(f"{e:.1e}" for e in errors))


if __name__ == "__main__":
    main()
