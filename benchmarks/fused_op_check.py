"""GPU smoke check of the fused Mamba-2 custom op, bf16, with and without doc masking: the op vs a direct
`mamba_split_conv1d_scan_combined` call (output and all 8 gradients), and a bamba-9b Mamba-2 block through
it, torch.compile(fullgraph=True) vs eager. Prints PASS/FAIL.   python benchmarks/fused_op_check.py
"""

import os

os.environ.setdefault("MAMBA_DETERMINISTIC", "1")  # mamba-ssm's backward without atomics: comparable runs

import torch

from fms_bamba.model import Bamba, BambaConfig
from fms_bamba.model.fused_mixer_op import split_conv1d_scan_fwd
from fms_bamba.model.kernels import mamba_split_conv1d_scan

BATCH, SEQ_LEN = 2, 1000  # not a multiple of the chunk


def rel_errors(values, refs):
    return [((v.float() - r.float()).norm() / r.float().norm().clamp(min=1e-30)).item() for v, r in zip(values, refs)]


def report(name, errors, limit):
    print(f"{'PASS' if max(errors) <= limit else 'FAIL'} {name}: relative L2 error {max(errors):.2e}, limit {limit:.0e}")
    return max(errors) <= limit


def outputs_and_grads(fn, leaves, dout):
    out = fn(*leaves)
    return [out.detach(), *torch.autograd.grad(out, leaves, dout)]


def check_op(mixer, doc_ids):
    weights, (chunk, groups, eps) = mixer.scan_inputs()
    zxbcdt = torch.randn(BATCH, SEQ_LEN, mixer.in_proj.out_features, device="cuda", dtype=torch.bfloat16)
    leaves = [t.detach().requires_grad_() for t in (zxbcdt, *weights)]
    seq_idx = None if doc_ids is None else doc_ids.int()
    dout = torch.randn(BATCH, SEQ_LEN, mixer.config.hidden_size, device="cuda", dtype=torch.bfloat16)

    def direct(zx, conv_w, conv_b, dt_bias, A, D, norm_w, out_w):
        return mamba_split_conv1d_scan()(
            zx, conv_w, conv_b, dt_bias, A, D, chunk, seq_idx=seq_idx, activation="silu", rmsnorm_weight=norm_w,
            rmsnorm_eps=eps, outproj_weight=out_w, headdim=mixer.config.mamba_head_dim, ngroups=groups,
            norm_before_gate=False)

    ops = outputs_and_grads(lambda *t: split_conv1d_scan_fwd(*t, seq_idx, chunk, groups, eps)[0], leaves, dout)
    first, again = (outputs_and_grads(direct, leaves, dout) for _ in range(2))
    limit = max(1e-6, *rel_errors(again, first))  # exact, up to the direct call's own run-to-run difference
    return report(f"op vs direct call, seq_idx {'off' if doc_ids is None else 'on'}", rel_errors(ops, first), limit)


def check_compiled_block(block, doc_ids):
    x = torch.randn(BATCH, SEQ_LEN, block.mixer.config.hidden_size, device="cuda", dtype=torch.bfloat16)
    results = []
    for fn in (block, torch.compile(block, fullgraph=True)):  # a graph break raises here
        inp = x.clone().requires_grad_()
        out = fn(inp, doc_ids)
        out.backward(torch.cos(out.detach().float()).bfloat16())
        results.append([out.detach(), inp.grad] + [p.grad for p in block.parameters()])
        block.zero_grad(set_to_none=True)
    # inductor rounds the rest of the block (norms, MLP) differently in bf16
    name = f"compiled block (fullgraph) vs eager, doc_ids {'off' if doc_ids is None else 'on'}"
    return report(name, rel_errors(results[1], results[0]), 2e-2)


def main():
    torch.manual_seed(0)
    config = BambaConfig.from_preset("bamba-9b", n_layers=1, attn_layer_indices=(), vocab_size=256,
                                     mixer_impl="kernels")
    with torch.device("cuda"):
        block = Bamba(config).to(torch.bfloat16).layers[0]
    docs = (torch.rand(BATCH, SEQ_LEN, device="cuda") < 0.002).cumsum(1)
    ok = all([check_op(block.mixer, d) for d in (None, docs)] + [check_compiled_block(block, d) for d in (None, docs)])
    print("ALL PASS" if ok else "SOME FAILED")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
