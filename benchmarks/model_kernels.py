"""Check mamba-ssm's fused Mamba-2 path against the pure-PyTorch reference, then time each layer.

On one GPU:   python benchmarks/model_kernels.py
On CPU (a smoke run of the same code, reference path only):
              python benchmarks/model_kernels.py --preset tiny --check-seq-len 100 --seq-lens 128 --no-full-model

1. Correctness (bf16, forward and all gradients), with and without document masking: the kernel
   path and the bf16 reference path are both compared to an fp32 reference; the kernel path's
   relative L2 error must stay within --tolerance or 3x the bf16 reference path's own error.
2. Forward+backward time of one Mamba-2 mixer (kernels and reference), one attention mixer, one
   SwiGLU MLP and one block of each kind, at the preset's shapes, batch 1, bf16.
3. Forward+backward of the whole model at the first sequence length (batch --full-batch; --compile:
   compiled as the trainer compiles it), with its MFU on that GPU: the step without FSDP or optimizer.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from fms_bamba.config import replace_fields
from fms_bamba.model import Bamba, BambaConfig, num_flops_per_token
from fms_bamba.model.kernels import kernels_available
from fms_bamba.parallel import compile_model

PEAK_BF16_FLOPS = 989e12  # H100/H200 dense bf16


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.float() - reference.float()).norm() / reference.float().norm().clamp(min=1e-30)).item()


def random_doc_ids(seq_len: int, n_docs: int, device: torch.device) -> torch.Tensor:
    cuts = torch.randperm(seq_len - 1, generator=torch.Generator().manual_seed(0))[: n_docs - 1] + 1
    starts = torch.zeros(seq_len, dtype=torch.long)
    starts[cuts] = 1
    return starts.cumsum(0)[None].to(device)


def single_layer_model(
    config: BambaConfig, attention: bool, device: torch.device, dtype: torch.dtype, mixer_impl: str = "auto"
) -> Bamba:
    """One block (same seed, so same weights for every mixer_impl) and a toy vocabulary."""
    torch.manual_seed(0)
    config = dataclasses.replace(
        config, n_layers=1, attn_layer_indices=(0,) if attention else (), vocab_size=256, mixer_impl=mixer_impl
    )
    with torch.device(device):
        model = Bamba(config)
    return model.to(dtype)


def mixer_outputs_and_grads(mixer, x, doc_ids, grad_out):
    x = x.detach().clone().requires_grad_()
    out = mixer(x, doc_ids)
    out.backward(grad_out)
    grads = {"input": x.grad} | {name: p.grad for name, p in mixer.named_parameters()}
    mixer.zero_grad(set_to_none=True)
    return out.detach(), grads


def check_kernels(config: BambaConfig, seq_len: int, device: torch.device, tolerance: float) -> bool:
    print(f"\n## kernels vs reference: Mamba-2 mixer, seq {seq_len}, batch 2, bf16 (relative L2 error vs fp32 reference)")
    have_kernels = device.type == "cuda" and kernels_available()
    if not have_kernels:
        print("kernel path unavailable here: comparing the bf16 reference path only")
    ok = True
    for doc_masking in (False, True):
        gold = single_layer_model(config, False, device, torch.float32, "reference").layers[0].mixer
        paths = {"reference bf16": "reference"} | ({"kernels bf16": "kernels"} if have_kernels else {})
        x = torch.randn(2, seq_len, config.hidden_size, device=device)
        grad_out = torch.randn(2, seq_len, config.hidden_size, device=device)
        doc_ids = random_doc_ids(seq_len, 5, device).expand(2, -1) if doc_masking else None
        out_gold, grads_gold = mixer_outputs_and_grads(gold, x, doc_ids, grad_out)
        print(f"\ndoc masking {'on' if doc_masking else 'off'}")
        print(f"{'tensor':<16}" + "".join(f"{name:>18}" for name in paths))
        rows = {"output": []} | {name: [] for name in grads_gold}
        for impl in paths.values():
            mixer = single_layer_model(config, False, device, torch.bfloat16, impl).layers[0].mixer
            out, grads = mixer_outputs_and_grads(mixer, x.bfloat16(), doc_ids, grad_out.bfloat16())
            rows["output"].append(relative_error(out, out_gold))
            for name in grads_gold:
                rows[name].append(relative_error(grads[name], grads_gold[name]))
        for name, errors in rows.items():
            print(f"{name:<16}" + "".join(f"{e:>18.2e}" for e in errors))
            if have_kernels:  # the kernels may err as bf16 itself does, or up to the tolerance
                ok &= errors[1] <= max(tolerance, 3 * errors[0])
    print(f"\nkernel path within max({tolerance}, 3 x bf16 reference error) everywhere: {ok if have_kernels else 'not run'}")
    return ok


def time_fwd_bwd(fn, device: torch.device, iters: int) -> float:
    """Median milliseconds of fn() (forward + backward)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def layer_timings(config: BambaConfig, seq_len: int, device: torch.device, iters: int) -> None:
    print(f"\n## forward+backward per layer, seq {seq_len}, batch 1, bf16 (median of {iters})")
    x = torch.randn(1, seq_len, config.hidden_size, device=device, dtype=torch.bfloat16, requires_grad=True)
    doc_ids = random_doc_ids(seq_len, 4, device)
    mamba_blocks = {impl: single_layer_model(config, False, device, torch.bfloat16, impl).layers[0] for impl in ("auto", "reference")}
    attention_block = single_layer_model(config, True, device, torch.bfloat16).layers[0]

    def run(module, docs=None):
        return lambda: module(x, docs).sum().backward()

    cases = []
    if device.type == "cuda" and kernels_available():
        cases += [
            ("Mamba-2 mixer, kernels", run(mamba_blocks["auto"].mixer)),
            ("Mamba-2 mixer, kernels, doc masking", run(mamba_blocks["auto"].mixer, doc_ids)),
        ]
    cases += [
        ("Mamba-2 mixer, reference", run(mamba_blocks["reference"].mixer)),
        ("Mamba-2 mixer, reference, doc masking", run(mamba_blocks["reference"].mixer, doc_ids)),
        ("attention mixer, SDPA causal", run(attention_block.mixer)),
        ("attention mixer, SDPA doc masking", run(attention_block.mixer, doc_ids)),
        ("SwiGLU MLP", lambda: attention_block.mlp(x).sum().backward()),
        ("Mamba-2 block (auto)", run(mamba_blocks["auto"])),
        ("attention block", run(attention_block)),
    ]
    for name, fn in cases:
        print(f"{name:<40} {time_fwd_bwd(fn, device, iters):9.2f} ms")


def full_model(config: BambaConfig, seq_len: int, device: torch.device, iters: int, batch: int = 1,
               compile: bool = False) -> None:
    """The step's computation alone: what the trainer adds on top (FSDP, optimizer) is the rest."""
    how = "each block and the loss compiled as the trainer does" if compile else "eager"
    print(f"\n## whole model forward+backward (loss), seq {seq_len}, batch {batch}, bf16 params, no FSDP, {how}")
    torch.manual_seed(0)
    with torch.device(device):
        model = Bamba(config)
    model = model.to(torch.bfloat16)
    if compile:
        compile_model(model)
    ids = torch.randint(0, config.vocab_size, (batch, seq_len), device=device)

    def step():
        model(ids, labels=ids).backward()
        model.zero_grad(set_to_none=True)

    ms = time_fwd_bwd(step, device, iters)
    tokens_per_s = batch * seq_len / (ms / 1e3)
    mfu = tokens_per_s * num_flops_per_token(config, seq_len) / PEAK_BF16_FLOPS
    print(f"{ms:.1f} ms/step, {tokens_per_s:,.0f} tokens/s, MFU {mfu:.1%} (peak {PEAK_BF16_FLOPS / 1e12:.0f} TFLOP/s)")
    if device.type == "cuda":
        print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="bamba-9b")
    parser.add_argument("--check-seq-len", type=int, default=2048)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--tolerance", type=float, default=2e-2)
    parser.add_argument("--no-full-model", action="store_true")
    parser.add_argument("--full-batch", type=int, default=1, help="the whole model's batch size")
    parser.add_argument("--compile", action="store_true", help="the whole model compiled as the trainer does")
    parser.add_argument("--full-model-only", action="store_true", help="skip the check and the per-layer times")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="BambaConfig fields over the preset")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = BambaConfig.from_preset(args.preset, max_seq_len=max(args.seq_lens + [args.check_seq_len]))
    config = replace_fields(config, args.set, where=" (--set)")
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    print(f"preset {args.preset}: hidden {config.hidden_size}, Mamba-2 {config.mamba_n_heads}x{config.mamba_head_dim}, "
          f"d_state {config.mamba_d_state}, chunk {config.mamba_chunk_size}")
    ok = args.full_model_only or check_kernels(config, args.check_seq_len, device, args.tolerance)
    for seq_len in [] if args.full_model_only else args.seq_lens:
        layer_timings(config, seq_len, device, args.iters)
    if not args.no_full_model:
        full_model(config, args.seq_lens[0], device, args.iters, args.full_batch, args.compile)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
