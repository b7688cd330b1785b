"""Generation on one GPU: the decoding path checked against the reference, then prefill time
and decode speed of bamba-9b (random bf16 weights), beside transformers' `generate`.

On one GPU (mamba-ssm and causal-conv1d installed):
    python benchmarks/generate.py --json generate.json
CPU smoke run of the same code (reference path, eager steps, no transformers):
    python benchmarks/generate.py --preset tiny --prompt-len 100 --batch-sizes 1 2 --new-tokens 8 --no-transformers

1. Correctness, on a small model with both block kinds and ragged prompts (fp32): logits of every
   step of the GPU path (fused prefill, single-step kernels, CUDA graph) against the pure-PyTorch
   reference, the CUDA graph against the same steps run eagerly, greedy tokens, and bf16's error.
2. The preset, random weights in bf16: prefill of batch x prompt-len tokens (seconds), then
   decoding (greedy, CUDA graph, no host sync in the loop): ms per step and tokens/s.
3. transformers' BambaForCausalLM.generate on the same weights and GPU (it uses the same
   mamba-ssm / causal-conv1d kernels): prefill and ms per decode step, while time is left.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import traceback

import torch

from fms_bamba.generate import SamplingConfig, generate_tokens, left_pad
from fms_bamba.model import Bamba, BambaConfig
from fms_bamba.model.decode import CudaGraphDecoder
from fms_bamba.model.kernels import kernels_available

START = time.perf_counter()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.float() - reference.float()).norm() / reference.float().norm()).item()


def random_model(config: BambaConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Bamba:
    """Initialised as for training (fp32 on the device), then cast."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = Bamba(config)
    model.to_empty(device=device)
    model.init_weights()
    return model.to(dtype).eval()


def same_weights(model: Bamba, config: BambaConfig, dtype: torch.dtype | None = None) -> Bamba:
    """Another Bamba (another compute path) on `model`'s weights, cast to dtype when given."""
    state = model.state_dict() if dtype is None else {k: v.to(dtype) for k, v in model.state_dict().items()}
    return Bamba.from_state_dict(config, state).eval()


def teacher_forced_logits(model: Bamba, ids: torch.Tensor, lengths: torch.Tensor, tokens: torch.Tensor,
                          cuda_graph: bool) -> torch.Tensor:
    """Logits [steps + 1, B, V] of prefill and of feeding tokens [B, steps] one step at a time."""
    logits, state = model.prefill(ids, lengths, max_new_tokens=tokens.shape[1])
    step = CudaGraphDecoder(model, state, ids.shape[0]) if cuda_graph else (lambda t: model.decode_step(t, state))
    out = [logits.float()]
    for i in range(tokens.shape[1]):
        out.append(step(tokens[:, i]).float().clone())  # a CUDA graph reuses its logits buffer
    return torch.stack(out)


def check(config: BambaConfig, device: torch.device, new_tokens: int) -> dict:
    """Section 1; returns the errors measured."""
    print("\n## decoding path vs reference (fp32; bf16 for its own error)")
    small = dataclasses.replace(config, n_layers=4, attn_layer_indices=(1,), vocab_size=1024, max_seq_len=1024,
                                check_token_ids=False)
    reference = random_model(dataclasses.replace(small, mixer_impl="reference"), device, torch.float32)
    fast = same_weights(reference, small)
    gen = torch.Generator().manual_seed(0)
    # ragged, across chunk boundaries
    prompts = [torch.randint(0, small.vocab_size, (n,), generator=gen).tolist() for n in (300, 77, 5, 260)]
    greedy = SamplingConfig(max_new_tokens=new_tokens, temperature=0)
    tokens_ref = generate_tokens(reference, prompts, greedy, cuda_graph=False)
    use_graph = device.type == "cuda"
    tokens_fast = generate_tokens(fast, prompts, greedy, cuda_graph=use_graph)
    agree = sum(a == b for ref_row, row in zip(tokens_ref, tokens_fast) for a, b in zip(ref_row, row))

    ids, lengths = left_pad(prompts)
    ids, forced = ids.to(device), torch.tensor(tokens_ref, device=device)
    gold = teacher_forced_logits(reference, ids, lengths, forced, cuda_graph=False)
    fast_logits = teacher_forced_logits(fast, ids, lengths, forced, cuda_graph=use_graph)
    eager_logits = teacher_forced_logits(fast, ids, lengths, forced, cuda_graph=False)
    bf16 = same_weights(reference, small, torch.bfloat16)
    bf16_logits = teacher_forced_logits(bf16, ids, lengths, forced, cuda_graph=use_graph)
    result = {
        "kernels": bool(fast.layers[0].mixer.step_kernels is not None and device.type == "cuda"),
        "cuda_graph": use_graph,
        "greedy_tokens_agree": f"{agree}/{len(prompts) * new_tokens}",
        "fp32_relative_error_vs_reference": relative_error(fast_logits, gold),
        "graph_vs_eager_max_abs_diff": (fast_logits - eager_logits).abs().max().item(),
        "bf16_relative_error_vs_fp32_reference": relative_error(bf16_logits, gold),
        "bf16_reference_path_relative_error": relative_error(
            teacher_forced_logits(same_weights(reference, dataclasses.replace(small, mixer_impl="reference"),
                                               torch.bfloat16), ids, lengths, forced, cuda_graph=False), gold),
    }
    for key, value in result.items():
        print(f"{key:<40} {value}")
    return result


def time_prefill_and_decode(model: Bamba, batch: int, prompt_len: int, new_tokens: int, device: torch.device) -> dict:
    """Section 2 at one batch size: prefill seconds, eager and CUDA-graph decode ms per step."""
    eager_steps = 8
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=device)
    model.prefill(ids, max_new_tokens=0)  # warm-up: kernel compilation, allocator growth
    synchronize(device)
    start = time.perf_counter()
    logits, state = model.prefill(ids, max_new_tokens=new_tokens + eager_steps + 2)
    synchronize(device)
    prefill_s = time.perf_counter() - start

    tokens = logits.argmax(-1)
    model.decode_step(tokens, state)  # warm-up of the eager step
    synchronize(device)
    start = time.perf_counter()
    for _ in range(eager_steps):
        logits = model.decode_step(tokens, state)
        tokens = logits.argmax(-1)
    synchronize(device)
    eager_ms = (time.perf_counter() - start) / eager_steps * 1e3

    step = CudaGraphDecoder(model, state, batch) if device.type == "cuda" else (lambda t: model.decode_step(t, state))
    logits = step(tokens)  # eager + capture
    synchronize(device)
    start = time.perf_counter()
    for _ in range(new_tokens):
        tokens = logits.argmax(-1)
        logits = step(tokens)
    synchronize(device)
    graph_ms = (time.perf_counter() - start) / new_tokens * 1e3
    result = {"batch": batch, "prompt_len": prompt_len, "prefill_s": prefill_s,
              "prefill_tokens_per_s": batch * prompt_len / prefill_s, "eager_step_ms": eager_ms,
              "step_ms": graph_ms, "decode_tokens_per_s": batch * 1e3 / graph_ms,
              "max_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
    print(f"batch {batch:>3}: prefill {prefill_s:7.3f} s ({result['prefill_tokens_per_s']:,.0f} tokens/s) | "
          f"decode step {graph_ms:6.2f} ms with the CUDA graph ({result['decode_tokens_per_s']:,.0f} tokens/s), "
          f"{eager_ms:6.2f} ms eager")
    return result


def time_transformers(model: Bamba, batch_sizes: list[int], prompt_len: int, new_tokens: int,
                      device: torch.device, deadline: float) -> list[dict]:
    """Section 3: transformers' generate on a copy of the weights, prefill and ms per decode step."""
    import transformers

    from fms_bamba.model import hf_mapping

    print(f"\n## transformers {transformers.__version__} BambaForCausalLM.generate, same weights")
    hf_config = transformers.BambaConfig(**hf_mapping.config_to_hf(model.config))
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            hf_model = transformers.BambaForCausalLM(hf_config)
    finally:
        torch.set_default_dtype(default_dtype)
    hf_model.load_state_dict(hf_mapping.to_hf_state_dict(model.state_dict(), model.config))
    hf_model.eval()
    results = []
    for batch in batch_sizes:
        if time.perf_counter() > deadline:
            print(f"batch {batch}: skipped (out of time)")
            continue
        ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=device)
        mask = torch.ones_like(ids)

        def generate(n: int) -> float:
            synchronize(device)
            start = time.perf_counter()
            with torch.no_grad():
                hf_model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  pad_token_id=0)
            synchronize(device)
            return time.perf_counter() - start

        generate(2)  # warm-up
        prefill_s = generate(1)
        total_s = generate(new_tokens + 1)
        step_ms = (total_s - prefill_s) / new_tokens * 1e3
        results.append({"batch": batch, "prefill_s": prefill_s, "step_ms": step_ms,
                        "decode_tokens_per_s": batch * 1e3 / step_ms})
        print(f"batch {batch:>3}: prefill {prefill_s:7.3f} s | decode step {step_ms:6.2f} ms "
              f"({batch * 1e3 / step_ms:,.0f} tokens/s)")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="bamba-9b")
    parser.add_argument("--prompt-len", type=int, default=4096)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--new-tokens", type=int, default=128, help="decode steps timed per batch size")
    parser.add_argument("--hf-new-tokens", type=int, default=16, help="decode steps timed for transformers")
    parser.add_argument("--check-tokens", type=int, default=24, help="decode steps of the correctness check")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--time-budget", type=float, default=230, help="seconds; transformers runs only while left")
    parser.add_argument("--json", help="write every figure here")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = BambaConfig.from_preset(args.preset, max_seq_len=args.prompt_len + args.new_tokens + 16,
                                     check_token_ids=False)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "kernels": kernels_available(), "preset": args.preset,
              "dtype": str(dtype)}
    print(" | ".join(f"{k}: {v}" for k, v in report.items()))

    def section(name: str, fn):
        try:
            report[name] = fn()
        except Exception:  # one failed section still leaves the others' figures
            traceback.print_exc()
            report[name] = "failed"

    section("check", lambda: check(config, device, args.check_tokens))
    print(f"\n## {args.preset}, random {dtype} weights: prefill {args.prompt_len} tokens, then "
          f"{args.new_tokens} decode steps (greedy)")
    model = random_model(config, device, dtype)
    for batch in args.batch_sizes:
        section(f"ours_batch_{batch}", lambda: time_prefill_and_decode(model, batch, args.prompt_len,
                                                                         args.new_tokens, device))
    if not args.no_transformers:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        section("transformers", lambda: time_transformers(model, args.batch_sizes, args.prompt_len,
                                                          args.hf_new_tokens, device, START + args.time_budget))
    report["seconds"] = time.perf_counter() - START
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    print(f"\ndone in {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
