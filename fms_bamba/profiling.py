"""`profiling.*`: a torch.profiler trace of a few training steps per rank, and a summary of where
the GPU's time went in them (busy vs idle, communication hidden vs exposed, kernels by kind).

RUN_DIR/profile/rank{R}.json.gz opens in Perfetto or chrome://tracing; rank{R}.txt holds the
summary and the top kernels. `python -m fms_bamba.profiling TRACE` prints the summary again."""

from __future__ import annotations

import gzip
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

# First match wins; kernel names as CUDA, cuBLAS, NCCL, Triton and Inductor print them.
KERNEL_KINDS = (
    ("communication", r"nccl"),
    ("optimizer", r"adam"),
    ("attention", r"flash|fmha|attention|sdpa"),
    ("matmul", r"gemm|nvjet|cutlass|xmma|sm90_|wgmma|cublas"),
    ("mamba kernels", r"^_(chunk|state_passing|bmm_chunk|layer_norm|causal_conv)|causal_conv1d|selective"),
    ("compiled (inductor)", r"^triton_"),
    # FSDP2's all-gather copy-in (a cast to bf16) and copy-out, its reduce-scatter's chunk_cat
    ("copies and casts", r"copy|cast|chunk_cat|split_with_sizes|memcpy|memset|fill"),
    ("other multi-tensor (foreach)", r"multi_tensor"),
)


def profiled_steps(cfg) -> range:
    """The steps a `profiling` section records (empty when it is off)."""
    return range(cfg.start_step, cfg.start_step + cfg.steps) if cfg.enable else range(0)


class StepProfiler:
    """Records `profiled_steps(cfg)`; every rank writes its own files."""

    def __init__(self, cfg, run_dir: Path, rank: int, first_step: int):
        self.cfg, self.rank = cfg, rank
        self.folder = Path(run_dir) / "profile"
        self.steps = profiled_steps(cfg)
        self.profiler: profile | None = None
        if self.steps and first_step > self.steps.start and rank == 0:
            print(f"profiling: this run resumes at step {first_step}, after profiling.start_step "
                  f"{cfg.start_step}: nothing is recorded", flush=True)

    def before_step(self, step: int) -> None:
        if self.steps and step == self.steps.start:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.profiler = profile(activities=activities)
            self.profiler.start()

    def after_step(self, step: int) -> float:
        """Write the trace and summary after the last recorded step; returns the seconds that took
        (0 otherwise), for the caller to leave out of its timings."""
        if self.profiler is None or step != self.steps[-1]:
            return 0.0
        start = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.profiler.stop()
        self.folder.mkdir(parents=True, exist_ok=True)
        trace = self.folder / f"rank{self.rank}.json.gz"
        self.profiler.export_chrome_trace(str(trace))
        table = self.profiler.key_averages().table(
            sort_by="self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total", row_limit=40)
        summary = summarize_trace(trace, len(self.steps))
        (self.folder / f"rank{self.rank}.txt").write_text(f"{summary}\n\n{table}\n")
        if self.rank == 0:
            print(f"profile of steps {self.steps.start}..{step} in {self.folder}\n{summary}", flush=True)
        self.profiler = None
        return time.perf_counter() - start

    def close(self) -> None:
        """Stop a recording the run ended in the middle of (nothing is written)."""
        if self.profiler is not None:
            self.profiler.stop()
            self.profiler = None


def merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """[start, end) intervals merged where they overlap or touch, in order."""
    out: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by [start, end) intervals."""
    return sum(end - start for start, end in merged(intervals))


def kernel_kind(name: str) -> str:
    for kind, pattern in KERNEL_KINDS:
        if re.search(pattern, name, re.IGNORECASE):
            return kind
    return "other"


def read_trace(path: str | Path) -> tuple[list[dict], list[dict]]:
    """A trace's events, and those that ran on the GPU (kernels, copies, memsets)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    return events, [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]


def count_gpu_events(path: str | Path, names: list[str], steps: int) -> str:
    """Per step: how many GPU events have each of `names` in their name, and their total ms."""
    _, kernels = read_trace(path)
    lines = []
    for name in names:
        matching = [k for k in kernels if name.lower() in k["name"].lower()]
        lines.append(f"{name:<24} {len(matching) / steps:8.1f} per step {sum(k['dur'] for k in matching) / steps / 1e3:9.2f} ms")
    return "\n".join(lines)


def summarize_trace(path: str | Path, steps: int, top: int = 8) -> str:
    """Per recorded step, in ms: the GPU time span, time with no kernel running, communication
    overlapped with computation and not, and kernel time by kind (summed over streams); then the
    `top` longest stalls of the window (`stalls`)."""
    events, kernels = read_trace(path)
    if not kernels:
        return "no GPU kernels recorded"
    spans = {"communication": [], "compute": []}
    by_kind: dict[str, float] = defaultdict(float)
    for e in kernels:
        kind = kernel_kind(e["name"])
        by_kind[kind] += e["dur"]
        spans["communication" if kind == "communication" else "compute"].append((e["ts"], e["ts"] + e["dur"]))
    start = min(s for s, _ in spans["compute"] + spans["communication"])
    end = max(e for _, e in spans["compute"] + spans["communication"])
    compute = union_length(spans["compute"])
    comm = union_length(spans["communication"])
    busy = union_length(spans["compute"] + spans["communication"])

    def per_step(us: float) -> float:
        """Microseconds in the recorded window -> milliseconds per step."""
        return us / steps / 1e3

    lines = [
        f"per step (ms), {steps} step(s) recorded:",
        f"  GPU time span                {per_step(end - start):9.1f}",
        f"  no kernel running            {per_step(end - start - busy):9.1f}",
        f"  computation running          {per_step(compute):9.1f}",
        f"  communication, overlapped    {per_step(compute + comm - busy):9.1f}",
        f"  communication, exposed       {per_step(busy - compute):9.1f}",
        "  kernel time by kind (all streams):",
    ]
    lines += [f"    {kind:<26} {per_step(us):9.1f}" for kind, us in sorted(by_kind.items(), key=lambda kv: -kv[1])]
    lines += stalls(events, kernels, spans["compute"] + spans["communication"], spans["compute"], start, top)
    return "\n".join(lines)


def stalls(events: list[dict], kernels: list[dict], busy: list[tuple[float, float]],
           computing: list[tuple[float, float]], start: float, top: int) -> list[str]:
    """The `top` longest stretches where the GPU ran nothing, and where it ran only communication,
    each with the kernels around it and the host code that launched the kernel that ended it: a
    launch inside the stretch means the GPU waited for the host. `busy` and `computing` are the
    [start, end) intervals of all kernels and of the computation kernels."""
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("ph") == "X" and e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    host_spans = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("user_annotation", "cpu_op")]

    def launched_from(kernel: dict) -> str:
        launch = launches.get(kernel.get("args", {}).get("correlation"))
        if launch is None:
            return "launch not recorded"
        # The innermost annotation and operator around the launch (FSDP's hooks annotate theirs).
        around = sorted((e for e in host_spans if e.get("tid") == launch.get("tid")
                         and e["ts"] <= launch["ts"] <= e["ts"] + e["dur"]), key=lambda e: e["dur"])
        names = [next((e["name"] for e in around if e["cat"] == cat), None) for cat in ("user_annotation", "cpu_op")]
        return f"launched at {(launch['ts'] - start) / 1e3:.2f} ms from " + " / ".join(n for n in names if n)

    def stretches(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
        """The gaps between the intervals, longest first."""
        spans = merged(intervals)
        gaps = [(end, next_start) for (_, end), (next_start, _) in zip(spans, spans[1:])]
        return sorted(gaps, key=lambda gap: gap[0] - gap[1])[:top]

    def describe(gaps: list[tuple[float, float]]) -> list[str]:
        out = []
        for gap_start, gap_end in gaps:
            before = max((k for k in kernels if k["ts"] + k["dur"] <= gap_start + 1e-3),
                         key=lambda k: k["ts"] + k["dur"], default=None)
            after = min((k for k in kernels if k["ts"] >= gap_end - 1e-3), key=lambda k: k["ts"], default=None)
            out.append(f"    {(gap_end - gap_start) / 1e3:7.2f} ms at {(gap_start - start) / 1e3:9.2f} ms: "
                       f"after {before['name'][:60] if before else '-'}; "
                       f"before {after['name'][:60] if after else '-'} ({launched_from(after) if after else '-'})")
        return out

    return (["  longest stretches with no kernel running (of the whole window):"] + describe(stretches(busy))
            + ["  longest stretches with no computation running:"] + describe(stretches(computing)))


if __name__ == "__main__":
    if len(sys.argv) < 2 or (len(sys.argv) > 3 and sys.argv[3] != "--count"):
        raise SystemExit("usage: python -m fms_bamba.profiling TRACE.json[.gz] [STEPS [--count NAME ...]]")
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    print(count_gpu_events(sys.argv[1], sys.argv[4:], steps) if len(sys.argv) > 3 else summarize_trace(sys.argv[1], steps))
