"""The LM head's fused chunked cross-entropy (fms_bamba/model/loss.py) on one GPU at Bamba-9B's
shapes (8,192 tokens x 4,096 -> 128,256, bf16): its loss and gradients against a float64
computation, beside autograd through the full logits, and the forward + backward time of
  full      autograd through all logits, cast to fp32 (the memory the fused path avoids)
  recompute chunks of 2,048 under activation checkpointing (fms-bamba before the fused loss)
  fused     the fused loss, eager elementwise part
  compiled  the fused loss with its elementwise part compiled (what parallelism.compile runs)
    python benchmarks/loss_check.py [--tokens 8192]
"""

import argparse
import time

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fms_bamba.model.loss import linear_cross_entropy, summed_loss_and_logit_grad

CHUNK = 2048


def full(h, w, y):
    return F.cross_entropy((h @ w.T).float(), y, reduction="sum")


def recompute(h, w, y):
    return sum(checkpoint(full, h[i : i + CHUNK], w, y[i : i + CHUNK], use_reentrant=False)
               for i in range(0, len(y), CHUNK))


def loss_and_grads(fn, h, w, y):
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    loss = fn(h, w, y)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def timed_ms(fn, h, w, y, repeats=10):
    for _ in range(3):
        loss_and_grads(fn, h, w, y)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        loss_and_grads(fn, h, w, y)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=8192)
    args = parser.parse_args()
    torch.manual_seed(0)
    h = torch.randn(args.tokens, 4096, device="cuda").bfloat16()
    w = (torch.randn(128256, 4096, device="cuda") * 0.02).bfloat16()
    y = torch.randint(0, 128256, (args.tokens,), device="cuda")
    y[::97] = -100
    compiled_part = torch.compile(summed_loss_and_logit_grad)
    paths = {
        "full": full,
        "recompute": recompute,
        "fused": lambda h, w, y: linear_cross_entropy(h, w, y, chunk_tokens=CHUNK),
        "compiled": lambda h, w, y: linear_cross_entropy(h, w, y, chunk_tokens=CHUNK, loss_and_grad=compiled_part),
    }
    exact = [t.double() for t in loss_and_grads(full, h.double(), w.double(), y)]
    errors = {}
    for name, fn in paths.items():
        got = loss_and_grads(fn, h, w, y)
        errors[name] = [((g.double() - e).norm() / e.norm()).item() for g, e in zip(got, exact)]
        del got
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        ms = timed_ms(fn, h, w, y)
        extra = (torch.cuda.max_memory_allocated() - base) / 2**30
        print(f"{name:9s} fwd+bwd {ms:7.2f} ms, peak {extra:5.2f} GiB above inputs, relative error vs float64: "
              f"loss {errors[name][0]:.2e}, dh {errors[name][1]:.2e}, dW {errors[name][2]:.2e}")
    ok = all(f <= 1.05 * u + 1e-6 for name in ("fused", "compiled") for f, u in zip(errors[name], errors["full"]))
    print(f"{'PASS' if ok else 'FAIL'} fused loss and gradients as close to float64 as autograd through full logits")


if __name__ == "__main__":
    main()
