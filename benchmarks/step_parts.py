"""Time the parts of a Bamba-9B training step on one GPU, at the step's shapes (micro-batch 2 x
4096 tokens, bf16), to find which are slow for their FLOPs:

    python benchmarks/step_parts.py [--tokens 8192] [--iters 10] [--parts linear mlp mixer] [--autotune]

1. each linear layer's three matmuls (forward, input and weight gradients) with cuBLAS and with
   cuBLASLt, with their TFLOP/s; then the slower ones with the weight stored transposed, and the
   Mamba-2 in_proj at other widths;
2. the SwiGLU MLP with gate and up as two matmuls and as one, eager and compiled;
   (--autotune: also under compile's max-autotune, which times Triton matmuls against cuBLAS);
3. the Mamba-2 mixer (mamba-ssm's kernels) at several SSD chunk sizes.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
import torch.nn.functional as F

from fms_bamba.model import BambaConfig
from fms_bamba.model.mamba2 import Mamba2Mixer
from model_kernels import time_fwd_bwd  # this folder's: the median of synchronised runs

CUDA = torch.device("cuda")


def matmul_passes(tokens: int, n_in: int, n_out: int, iters: int, weight_stored: str = "[out, in]") -> str:
    """A linear layer's three matmuls (forward, input gradient, weight gradient), with the weight
    stored [out, in] (nn.Linear's layout) or [in, out]: milliseconds and TFLOP/s of each and of all."""
    x = torch.randn(tokens, n_in, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(tokens, n_out, device="cuda", dtype=torch.bfloat16)
    if weight_stored == "[out, in]":
        w = torch.randn(n_out, n_in, device="cuda", dtype=torch.bfloat16)
        fns = (lambda: x @ w.t(), lambda: dy @ w, lambda: dy.t() @ x)
    else:
        w_t = torch.randn(n_in, n_out, device="cuda", dtype=torch.bfloat16)
        fns = (lambda: x @ w_t, lambda: dy @ w_t.t(), lambda: x.t() @ dy)
    passes = [time_fwd_bwd(fn, CUDA, iters) for fn in fns]
    flops = 2 * tokens * n_in * n_out
    return (f"[{n_in:>6} -> {n_out:>6}] {weight_stored} "
            + "  ".join(f"{ms:6.2f} ms {flops / ms / 1e9:4.0f}" for ms in passes)
            + f"  | {sum(passes):6.2f} ms {3 * flops / sum(passes) / 1e9:4.0f} TFLOP/s")


def linear_timings(config: BambaConfig, tokens: int, iters: int) -> None:
    d, h = config.hidden_size, config.mlp_hidden_size
    in_proj = config.mamba_d_inner + config.mamba_conv_dim + config.mamba_n_heads
    shapes = {
        "mlp gate or up": (d, h), "mlp gate+up as one": (d, 2 * h), "mlp down": (h, d),
        "mamba in_proj": (d, in_proj), "mamba out_proj": (config.mamba_d_inner, d),
        "lm head, one 8192-token chunk": (d, config.vocab_size),
    }
    for library in ("cublas", "cublaslt"):
        torch.backends.cuda.preferred_blas_library(library)
        print(f"## linear layers, {tokens} tokens, bf16, {library} (median of {iters}): forward, input "
              "gradient, weight gradient, all three")
        for name, (n_in, n_out) in shapes.items():
            print(f"{name:<30} {matmul_passes(tokens, n_in, n_out, iters)}")
    torch.backends.cuda.preferred_blas_library("default")


def layout_timings(config: BambaConfig, tokens: int, iters: int) -> None:
    """The slower projections with the weight stored [out, in] and [in, out], and the Mamba-2
    in_proj at widths around its own (16,768 = 131 x 128)."""
    d = config.hidden_size
    in_proj = config.mamba_d_inner + config.mamba_conv_dim + config.mamba_n_heads
    shapes = [("mamba in_proj", d, n) for n in (in_proj, 16384, 16640, 16896, 17152)]
    shapes += [("mamba out_proj", config.mamba_d_inner, d), ("mlp down", config.mlp_hidden_size, d)]
    print(f"\n## weight layouts, {tokens} tokens, cuBLAS: forward, input gradient, weight gradient, all three")
    for name, n_in, n_out in shapes:
        for stored in ("[out, in]", "[in, out]"):
            print(f"{name:<15} {matmul_passes(tokens, n_in, n_out, iters, stored)}")


def swiglu_split(x, gate, up, down):
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def swiglu_fused(x, gate_up, down):
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


def mlp_timings(config: BambaConfig, tokens: int, iters: int, autotune: bool) -> None:
    d, h = config.hidden_size, config.mlp_hidden_size
    weights = [torch.randn(n_out, n_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for n_out, n_in in ((h, d), (h, d), (d, h))]
    gate_up = torch.cat(weights[:2]).detach().requires_grad_()
    x = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16)
    flops = 6 * tokens * 3 * d * h
    print(f"\n## SwiGLU MLP forward+backward, {tokens} tokens")
    for compiled in (False, True, "max-autotune-no-cudagraphs") if autotune else (False, True):
        mode = compiled if isinstance(compiled, str) else None
        split = torch.compile(swiglu_split, mode=mode) if compiled else swiglu_split
        fused = torch.compile(swiglu_fused, mode=mode) if compiled else swiglu_fused
        for name, fn in (("gate, up separate", lambda: split(x, *weights).backward(dy)),
                         ("gate+up one matmul", lambda: fused(x, gate_up, weights[2]).backward(dy))):
            ms = time_fwd_bwd(fn, CUDA, iters)
            print(f"{mode or ('compiled' if compiled else 'eager'):<9} {name:<20} {ms:7.2f} ms  {flops / ms / 1e9:6.0f} TFLOP/s")


def mixer_timings(config: BambaConfig, tokens: int, iters: int) -> None:
    print(f"\n## Mamba-2 mixer (kernels) forward+backward, batch 2 x {tokens // 2}")
    x = torch.randn(2, tokens // 2, config.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for chunk in (64, 128, 256):
        torch.manual_seed(0)
        with torch.device("cuda"):
            mixer = Mamba2Mixer(dataclasses.replace(config, mamba_chunk_size=chunk, mixer_impl="kernels")).bfloat16()
        for p in mixer.parameters():
            torch.nn.init.normal_(p, std=0.02)
        ms = time_fwd_bwd(lambda: mixer(x).sum().backward(), CUDA, iters)
        print(f"chunk {chunk:<4} {ms:7.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--parts", nargs="+", default=["linear", "layout", "mlp", "mixer"],
                        choices=["linear", "layout", "mlp", "mixer"])
    parser.add_argument("--autotune", action="store_true", help="also the MLP under compile's max-autotune")
    args = parser.parse_args()
    config = BambaConfig.from_preset("bamba-9b")
    print(torch.cuda.get_device_name(), torch.__version__)
    if "linear" in args.parts:
        linear_timings(config, args.tokens, args.iters)
    if "layout" in args.parts:
        layout_timings(config, args.tokens, args.iters)
    if "mlp" in args.parts:
        mlp_timings(config, args.tokens, args.iters, args.autotune)
    if "mixer" in args.parts:
        mixer_timings(config, args.tokens, args.iters)


if __name__ == "__main__":
    main()
