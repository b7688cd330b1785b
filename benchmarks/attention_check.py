"""Causal attention of a Bamba-9B attention layer at the step's shapes (micro-batch 2 x 4096, 32
query heads, 8 key/value heads, head dim 128, bf16): forward + backward time of each SDPA backend,
and each one's error against float64 for the output and the three input gradients.

    python benchmarks/attention_check.py [--batch 2] [--seq-len 4096] [--iters 20]     # one GPU

GQA is passed as SDPA's `enable_gqa` where the backend takes it, else with keys and values
repeated to every query head (what a backend without GQA needs; the repeat is timed with it)."""

from __future__ import annotations

import argparse
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fms_bamba.model import BambaConfig
from model_kernels import relative_error, time_fwd_bwd  # this folder's


def attention(backend: SDPBackend | None, gqa: bool):
    """SDPA on `backend` (None: the one torch picks, as the model's attention does)."""
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if not gqa:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        with nullcontext() if backend is None else sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return run


def relative_errors(run, q, k, v, dout, exact) -> list[float]:
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = run(q, k, v)
    out.backward(dout)
    return [relative_error(got, ref) for got, ref in zip((out, q.grad, k.grad, v.grad), exact)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    config = BambaConfig.from_preset("bamba-9b")
    torch.manual_seed(0)
    shape = (args.batch, config.n_heads, args.seq_len, config.head_dim)
    kv_shape = (args.batch, config.n_kv_heads, args.seq_len, config.head_dim)
    q = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(kv_shape, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    dout = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    # the float64 reference: SDPA's math backend, keys and values repeated per query head
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    out64 = attention(SDPBackend.MATH, gqa=False)(q64, k64, v64)
    out64.backward(dout.double())
    exact = (out64.detach(), q64.grad, k64.grad, v64.grad)
    del q64, k64, v64, out64
    flops = 4 * args.batch * config.n_heads * args.seq_len ** 2 * config.head_dim / 2 * 3.5  # causal, fwd + 2.5x bwd
    print(f"batch {args.batch} x {args.seq_len}, {config.n_heads} / {config.n_kv_heads} heads of {config.head_dim}; "
          "forward+backward ms, TFLOP/s, relative error of output / dq / dk / dv vs float64")
    for backend in (None, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        for gqa in (True, False):
            run = attention(backend, gqa)
            label = f"{'torch picks' if backend is None else backend.name.lower()} {'enable_gqa' if gqa else 'repeated kv'}"
            try:
                errors = relative_errors(run, q, k, v, dout, exact)
                qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
                ms = time_fwd_bwd(lambda: run(qg, kg, vg).backward(dout), torch.device("cuda"), args.iters)
            except RuntimeError as error:  # a backend that does not take these inputs
                print(f"{label:<34} not run: {str(error).splitlines()[0][:120]}")
                continue
            print(f"{label:<34} {ms:7.3f} ms {flops / ms / 1e9:6.0f} TFLOP/s  " + " / ".join(f"{e:.1e}" for e in errors))


if __name__ == "__main__":
    main()
