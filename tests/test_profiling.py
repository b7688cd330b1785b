"""The step-trace summary: GPU busy and idle time, communication overlapped or exposed, kernels by kind."""

import gzip
import json

import pytest
import torch

from fms_bamba.config import ProfilingSection
from fms_bamba.profiling import StepProfiler, count_gpu_events, kernel_kind, summarize_trace, union_length


def kernel(name, start, duration, stream):
    return {"ph": "X", "cat": "kernel", "name": name, "ts": start, "dur": duration, "args": {"stream": stream}}


def test_union_length_merges_overlaps():
    assert union_length([(0, 10), (5, 15), (20, 30), (22, 25)]) == 25
    assert union_length([]) == 0


@pytest.mark.parametrize("name, kind", [
    ("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "communication"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
    ("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNN", "matmul"),
    ("_chunk_scan_fwd_kernel", "mamba kernels"),
    ("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0", "compiled (inductor)"),
    ("void at::native::elementwise_kernel<128, 4, direct_copy_kernel_cuda>", "copies and casts"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<TensorListMetadata<2>, "
     "UnaryOpFunctor<float, 2, 1, 1>, Copy<float, float>>", "copies and casts"),
    ("void at::native::detail::chunk_cat_cuda_kernel<float, float>", "copies and casts"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "attention"),
])
def test_kernel_kinds(name, kind):
    assert kernel_kind(name) == kind


def test_summary_of_two_steps(tmp_path):
    # Times in ms (x1000 in the trace's us). Over 2 steps: compute 0..300 and 500..900 on one
    # stream; communication 200..600 (200 overlapped, 200 alone) and 999..1000 (alone) on another;
    # nothing runs 900..999.
    ms = 1000
    events = [kernel("nvjet_gemm", 0, 300 * ms, 7), kernel("triton_poi_fused_add_0", 500 * ms, 400 * ms, 7),
              kernel("ncclDevKernel_AllGather", 200 * ms, 400 * ms, 20), kernel("ncclDevKernel_End", 999 * ms, ms, 20),
              {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 5000 * ms}]
    trace = tmp_path / "rank0.json.gz"
    trace.write_bytes(gzip.compress(json.dumps({"traceEvents": events}).encode()))
    rows = [line.rsplit(None, 1) for line in summarize_trace(trace, steps=2).splitlines()[1:]]
    per_step = {label.strip(): float(value) for label, value in rows if value[-1].isdigit()}
    assert per_step == {
        "GPU time span": 500.0, "no kernel running": 49.5, "computation running": 350.0,
        "communication, overlapped": 100.0, "communication, exposed": 100.5,
        "communication": 200.5, "compiled (inductor)": 200.0, "matmul": 150.0,
    }


def test_gpu_events_counted_by_name(tmp_path):
    """Per step, over 2 steps: GPU events (kernels and copies, not host operators) whose name holds each string."""
    events = [kernel("ncclDevKernel_AllGather_RING_LL", 0, 3000, 20), kernel("ncclDevKernel_AllGather_RING_LL", 0, 1000, 20),
              {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy PtoP (Device -> Device)", "ts": 0, "dur": 500},
              {"ph": "X", "cat": "cpu_op", "name": "c10d::allgather_", "ts": 0, "dur": 9000}]
    trace = tmp_path / "rank0.json.gz"
    trace.write_bytes(gzip.compress(json.dumps({"traceEvents": events}).encode()))
    rows = [line.split() for line in count_gpu_events(trace, ["allgather", "Memcpy", "chunk_cat"], steps=2).splitlines()]
    assert [(row[0], float(row[1]), float(row[-2])) for row in rows] == [
        ("allgather", 1.0, 2.0), ("Memcpy", 0.5, 0.25), ("chunk_cat", 0.0, 0.0)]


def test_step_profiler_records_its_window_only(tmp_path, capsys):
    cfg = ProfilingSection(enable=True, start_step=2, steps=2)
    profiler = StepProfiler(cfg, tmp_path / "run", rank=0, first_step=1)
    for step in range(1, 6):
        profiler.before_step(step)
        torch.mm(torch.ones(8, 8), torch.ones(8, 8))
        assert (profiler.after_step(step) > 0) == (step == 3)  # written after the window's last step
    trace = json.loads(gzip.decompress((tmp_path / "run" / "profile" / "rank0.json.gz").read_bytes()))
    assert any(event.get("name") == "aten::mm" for event in trace["traceEvents"])
    assert "profile of steps 2..3" in capsys.readouterr().out

    resumed = StepProfiler(cfg, tmp_path / "resumed", rank=0, first_step=3)  # began after start_step
    assert "nothing is recorded" in capsys.readouterr().out
    resumed.before_step(3)
    assert resumed.after_step(3) == 0 and not (tmp_path / "resumed").exists()

    cut = StepProfiler(cfg, tmp_path / "cut", rank=0, first_step=1)
    cut.before_step(2)  # the run ends inside the window: close stops the recording, writes nothing
    cut.close()
    assert cut.profiler is None and not (tmp_path / "cut").exists()
    profiler.before_step(2)  # a profiler can start again: none was left running
    profiler.close()


def test_stalls_name_the_kernels_around_them_and_the_launching_host_code(tmp_path):
    # Compute 0..100 and 300..400 us; an all-gather 100..250 alone. The kernel at 300 was launched
    # at 290 from FSDP's pre-forward hook (the GPU waited on the host); nothing ran 250..300.
    def launched(name, start, duration, stream, correlation):
        return dict(kernel(name, start, duration, stream), args={"stream": stream, "correlation": correlation})

    events = [launched("nvjet_gemm", 0, 100, 7, 1), launched("ncclDevKernel_AllGather", 100, 150, 20, 2),
              launched("triton_poi_fused_add_0", 300, 100, 7, 3),
              {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 290, "dur": 2, "tid": 1,
               "args": {"correlation": 3}},
              {"ph": "X", "cat": "user_annotation", "name": "FSDP::pre_forward", "ts": 200, "dur": 95, "tid": 1},
              {"ph": "X", "cat": "cpu_op", "name": "aten::add", "ts": 289, "dur": 4, "tid": 1},
              {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 400, "tid": 2}]  # another thread
    trace = tmp_path / "rank0.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    lines = summarize_trace(trace, steps=1).splitlines()
    idle = lines[lines.index("  longest stretches with no kernel running (of the whole window):") + 1]
    assert idle == ("       0.05 ms at      0.25 ms: after ncclDevKernel_AllGather; before triton_poi_fused_add_0 "
                    "(launched at 0.29 ms from FSDP::pre_forward / aten::add)")
    no_compute = lines[lines.index("  longest stretches with no computation running:") + 1:]
    assert len(no_compute) == 1 and no_compute[0].startswith("       0.20 ms at      0.10 ms: after nvjet_gemm;")
