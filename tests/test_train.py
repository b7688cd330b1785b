"""The trainer end to end on CPU: a 2-process gloo run, gradient accumulation across ranks, NaN
skipping, the built-in corpus, bad input before any process group, the plot command."""

import gc
import gzip
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fms_bamba import cli, default_corpus, plot
from fms_bamba.checkpoint import (
    CHECKPOINTS_FOLDER,
    CheckpointConfig,
    check_init_from,
    checkpoint_dir_name,
    latest_complete_checkpoint,
    load_tensors,
    read_dcp_metadata,
    write_checkpoint,
)
from fms_bamba.config import ConfigError, load_job_config
from fms_bamba.model import BambaConfig
from fms_bamba.preemption import EXIT_PREEMPTED, PreemptionHandler
from fms_bamba.train import TrainingDiverged, plan_batch, train

CONTRACT_FIELDS = {"step", "loss", "lr", "grad_norm", "tokens_seen", "tokens_per_sec_per_gpu", "mfu", "mem_gib"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The built-in corpus machinery on the first 40 stdlib files (the full one takes ~30 s)."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FMS_BAMBA_CACHE", str(cache))
        patch.setattr(default_corpus, "stdlib_sources", lambda: SOURCES[:40])
        return default_corpus.default_corpus()


SOURCES = default_corpus.stdlib_sources()


def tiny_overrides(run_dir: Path, corpus: Path, **extra) -> dict:
    return {"job.run_dir": str(run_dir), "data.root": str(corpus), "data.datasets": [default_corpus.DATASET_NAME],
            "data.num_workers": 0, "model.tokenizer": str(corpus / "tokenizer.json"),
            "training.seq_len": 64, "training.micro_batch_size": 4, "training.steps": 30,
            "lr_scheduler.warmup_steps": 5, "metrics.log_interval": 5, "checkpoint.interval": 10, **extra}


def as_cli_args(overrides: dict) -> list[str]:
    return [f"--{key}={json.dumps(value) if isinstance(value, list) else value}" for key, value in overrides.items()]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(nproc: int, overrides: dict, timeout: int = 240) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               "-m", "fms_bamba.cli", "train", *as_cli_args(overrides)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def two_process_run(corpus, tmp_path_factory):
    """HSDP (2 replicas x 1 shard), activation checkpointing of every 2nd block, 2 micro-batches per step."""
    run_dir = tmp_path_factory.mktemp("two_process") / "run"
    torchrun(2, tiny_overrides(run_dir, corpus, **{
        "training.micro_batch_size": 2, "training.global_batch_sequences": 8, "parallelism.dp_replicate": 2,
        "parallelism.activation_checkpoint": "every-2",
        "profiling.enable": True, "profiling.start_step": 3, "profiling.steps": 2}))
    return run_dir


def test_default_corpus_is_built_once(corpus, monkeypatch):
    assert (corpus / "tokenizer.json").is_file()
    assert sorted(p.name for p in (corpus / default_corpus.DATASET_NAME).iterdir()) == ["counts.csv", "documents.arrow"]
    assert [p.name for p in corpus.parent.iterdir() if ".tmp-" in p.name] == []  # no half-built leftovers
    monkeypatch.setenv("FMS_BAMBA_CACHE", str(corpus.parent))
    monkeypatch.setattr(default_corpus, "_build", lambda out: pytest.fail("rebuilt a cached corpus"))
    assert default_corpus.default_corpus() == corpus


@pytest.mark.slow
def test_two_process_run_trains(two_process_run, corpus):
    records = read_metrics(two_process_run)
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30]
    for record in records:
        assert CONTRACT_FIELDS <= record.keys()
        assert all(record[key] is not None for key in CONTRACT_FIELDS)
    assert records[-1]["tokens_seen"] == 30 * 8 * 64
    assert records[-1]["skipped_steps"] == 0
    # From ~ln(vocab) the loss must clearly fall in 30 steps.
    assert records[-1]["loss"] < records[0]["loss"] - 1.0, [r["loss"] for r in records]
    resolved = load_job_config(two_process_run / "config.yaml")
    assert resolved.training.steps == 30 and resolved.data.root == str(corpus)
    assert (two_process_run / "tokenizer" / "tokenizer.json").read_bytes() == (corpus / "tokenizer.json").read_bytes()
    # Checkpoint keys are the model's own names, whatever wrappers parallelism added.
    keys = read_dcp_metadata(two_process_run / "checkpoints" / "step-00000030").state_dict_metadata
    assert "model.layers.0.mixer.A_log" in keys
    assert not [key for key in keys if "_checkpoint_wrapped_module" in key or "_orig_mod" in key]
    # Every rank profiled steps 3..4: a trace with those steps' work and a summary.
    for rank in (0, 1):
        trace = json.loads(gzip.decompress((two_process_run / "profile" / f"rank{rank}.json.gz").read_bytes()))
        assert any("aten::mm" in event.get("name", "") for event in trace["traceEvents"])
        assert (two_process_run / "profile" / f"rank{rank}.txt").read_text().strip()


@pytest.mark.slow
def test_two_process_grad_accumulation_matches_one_process(two_process_run, corpus, tmp_path):
    """Global batch 8: 1 process x micro-batch 8 vs 2 processes x micro-batch 2 x 2 accumulation
    steps, both from the same weights and data. Step 1 sees identical weights, so its loss and the
    norm of the accumulated gradient agree to float32 rounding (1e-5 / 1e-4 relative); Adam's
    first updates amplify rounding differences, so later losses agree to 1e-3."""
    start = {"checkpoint.init_from": str(two_process_run / "checkpoints" / "step-00000010"),
             "checkpoint.init_load": "model", "checkpoint.enable": False, "training.steps": 4,
             "training.global_batch_sequences": 8, "metrics.log_interval": 1, "lr_scheduler.warmup_steps": 0}
    train(load_job_config(None, tiny_overrides(tmp_path / "one", corpus, **start, **{"training.micro_batch_size": 8})))
    torchrun(2, tiny_overrides(tmp_path / "two", corpus, **start, **{"training.micro_batch_size": 2}))
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
    assert one[0]["loss"] == pytest.approx(two[0]["loss"], rel=1e-5)
    assert one[0]["grad_norm"] == pytest.approx(two[0]["grad_norm"], rel=1e-4)
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-3)
    # The steps really trained: same data, falling loss.
    assert one[-1]["loss"] < one[0]["loss"]


def test_start_shows_what_the_run_reads_of_each_source(corpus, tmp_path, capsys):
    """The reading plan printed before step 1 is what the last checkpoint says was read."""
    run_dir = tmp_path / "run"
    train(load_job_config(None, tiny_overrides(run_dir, corpus, **{"training.steps": 3, "checkpoint.interval": 3,
                                                                   "lr_scheduler.warmup_steps": 1})))
    meta = json.loads((run_dir / "checkpoints" / "step-00000003" / "meta.json").read_text())
    (source,) = meta["data_loader"]["datasets"]
    assert source["tokens_consumed"] == 3 * 4 * 65  # steps x sequences x (seq_len + 1)
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("  data "))
    epochs = source["tokens_consumed"] / source["epoch_tokens"]
    assert line == (f"  data {source['name']} (weight 1): reads {source['tokens_consumed']:,} of its "
                    f"{source['epoch_tokens']:,} tokens by step 3 ({epochs:.3g} epochs)")


def test_garbage_is_collected_every_n_steps_with_automatic_collection_off(corpus, tmp_path, monkeypatch):
    collections = []  # (generation, automatic collection on?) of each collection the trainer asks for
    collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda generation=2: collections.append((generation, gc.isenabled()))
                        or collect(generation))
    train(load_job_config(None, tiny_overrides(tmp_path / "run", corpus, **{
        "training.steps": 5, "training.gc_interval": 2, "lr_scheduler.warmup_steps": 1, "checkpoint.enable": False})))
    trainer_calls = [call for call in collections if call[0] in (1, 2)]
    assert trainer_calls[0] == (2, False)  # a full collection once automatic collection is off
    assert trainer_calls.count((1, False)) == 2  # steps 2 and 4
    assert gc.isenabled()  # back on after the run
    collections.clear()
    train(load_job_config(None, tiny_overrides(tmp_path / "auto", corpus, **{
        "training.steps": 3, "training.gc_interval": 0, "lr_scheduler.warmup_steps": 1, "checkpoint.enable": False})))
    assert (1, False) not in collections and (1, True) not in collections


def test_nan_loss_is_skipped_and_reported(corpus, tmp_path, capsys):
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(run_dir, corpus, **{
        "training.steps": 4, "training.debug_nan_at_steps": [2], "metrics.log_interval": 1, "lr_scheduler.warmup_steps": 1,
        "checkpoint.interval": 4, "metrics.wandb": True, "metrics.wandb_mode": "offline"})
    train(load_job_config(None, overrides))
    records = read_metrics(run_dir)
    assert [r["skipped_steps"] for r in records] == [0, 1, 1, 1]
    assert records[1]["loss"] is None and records[1]["grad_norm"] is None
    assert all(r["loss"] is not None for r in records if r["step"] != 2)
    assert "skipped 1" in capsys.readouterr().out
    meta = json.loads((run_dir / "checkpoints" / "step-00000004" / "meta.json").read_text())
    assert meta["trainer_state"]["skipped_steps"] == 1
    # W&B offline: the run id kept in the trainer state names the local W&B run a resume continues.
    run_id = meta["trainer_state"]["wandb_run_id"]
    assert run_id and len(list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))) == 1

    # Relaunched with a longer schedule, the job resumes at step 5, keeps its skip count and logs
    # to the same W&B run.
    train(load_job_config(None, {**overrides, "training.steps": 6}))
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6] and records[-1]["skipped_steps"] == 1
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))) == 2
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2


def test_consecutive_nans_stop_the_run(corpus, tmp_path):
    overrides = tiny_overrides(tmp_path / "run", corpus, **{
        "training.steps": 6, "training.debug_nan_at_steps": [2, 3, 4], "training.max_consecutive_skips": 3,
        "metrics.log_interval": 5, "checkpoint.enable": False})
    with pytest.raises(TrainingDiverged, match=r"3 optimizer steps in a row had a non-finite loss"):
        train(load_job_config(None, overrides))


class SignalledPreemption(PreemptionHandler):
    """As if a signal had arrived during the first step."""

    def stop_requested(self) -> bool:
        return True


@pytest.mark.parametrize("steps, preempted", [(2, True), (1, False)])
def test_a_signal_in_the_last_step_ends_the_run_complete(corpus, tmp_path, monkeypatch, steps, preempted):
    monkeypatch.setattr("fms_bamba.train.PreemptionHandler", SignalledPreemption)
    cfg = load_job_config(None, tiny_overrides(tmp_path / "run", corpus, **{"training.steps": steps, "lr_scheduler.warmup_steps": 1}))
    if preempted:
        with pytest.raises(SystemExit) as exit_info:
            train(cfg)
        assert exit_info.value.code == EXIT_PREEMPTED
    else:
        train(cfg)  # no SystemExit: a finished run must not be requeued
    assert latest_complete_checkpoint(tmp_path / "run").name == checkpoint_dir_name(1)


@pytest.mark.parametrize("make_args, message", [
    (lambda tmp, corpus: [str(tmp / "missing.yaml")], r"config file .*missing\.yaml does not exist"),
    (lambda tmp, corpus: ["--training.stepz=3"], r"unknown config key training\.stepz"),
    (lambda tmp, corpus: as_cli_args(tiny_overrides(tmp / "run", corpus, **{"training.global_batch_sequences": 12})),
     r"training\.global_batch_sequences gives 12 sequences per step, which 2 processes x training\.micro_batch_size 4"),
    (lambda tmp, corpus: as_cli_args(tiny_overrides(tmp / "run", corpus, **{"data.root": str(tmp), "data.datasets": ["empty"]})),
     r"data\.datasets: dataset directory .*empty holds no \.arrow or \.parquet shards"),
    (lambda tmp, corpus: as_cli_args(tiny_overrides(tmp / "run", corpus, **{"checkpoint.init_from": str(tmp / "gone")})),
     r"checkpoint\.init_from: .*gone"),
    (lambda tmp, corpus: ["--parallelism.reshard_after_forward=sometimes"],
     r"parallelism\.reshard_after_forward must be one of \('default', 'always', 'never', 'keep-last-N'\), "
     r"got 'sometimes'"),
    (lambda tmp, corpus: ["--parallelism.reduce_dtype=float8"], r"parallelism\.reduce_dtype must be one of"),
    (lambda tmp, corpus: ["--parallelism.all_gather=mpi"], r"parallelism\.all_gather must be one of"),
    (lambda tmp, corpus: ["--parallelism.all_gather=copy-engine"],
     r"parallelism\.all_gather=copy-engine needs CUDA devices \(NCCL\), not cpu"),
    (lambda tmp, corpus: ["--optimizer.master_weights=true", "--training.dtype=float32"],
     r"optimizer\.master_weights keeps fp32 masters of a bf16 model: it needs training\.dtype bfloat16"),
    (lambda tmp, corpus: as_cli_args(tiny_overrides(tmp / "run", corpus, **{
        "optimizer.master_weights": True, "training.global_batch_sequences": 16})),
     r"optimizer\.master_weights keeps gradients in bf16, too coarse to accumulate 2 micro-batches per step"),
    (lambda tmp, corpus: ["--optimizer.moments_dtype=float16"], r"optimizer\.moments_dtype must be one of"),
    (lambda tmp, corpus: ["--optimizer.moments_dtype=bfloat16"],
     r"optimizer\.moments_dtype=bfloat16 needs optimizer\.master_weights=true"),
    (lambda tmp, corpus: ["--optimizer.master_weights=true", "--optimizer.moments_dtype=bfloat16",
                          "--optimizer.beta2=0.999"],
     r"optimizer\.moments_dtype=bfloat16 would round away optimizer\.beta2's decay of 0\.001 per step"),
    (lambda tmp, corpus: ["--training.gc_interval=-1"], r"training\.gc_interval must be >= 0, got -1"),
    (lambda tmp, corpus: ["--profiling.steps=0"], r"profiling\.start_step and profiling\.steps must be >= 1"),
    (lambda tmp, corpus: ["--profiling.enable=true", "--profiling.start_step=299", "--profiling.steps=3"],
     r"profiling: steps 299\.\.301 run past training\.steps \(300\)"),
])
def test_bad_input_fails_before_the_process_group(corpus, tmp_path, monkeypatch, capsys, make_args, message):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun: an early process group would wait for rank 1
    monkeypatch.setattr("fms_bamba.train.init_distributed",
                        lambda device, cfg: pytest.fail("process group set up before the input was checked"))
    assert cli.main(["train", *make_args(tmp_path, corpus)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fms-bamba train: error: ") and "Traceback" not in err
    assert re.search(message, err), err


def test_plot_draws_the_run(two_process_run, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    records = read_metrics(two_process_run)
    # A resumed run logs steps again after its checkpoint; the plot keeps the latest record.
    relogged = {**records[-1], "loss": 0.5}
    lines = [json.dumps(r) for r in records + [relogged]] + ['{"step": 35, "lo']  # cut by a kill
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert plot.read_metrics(run_dir)[-1] == relogged
    assert cli.main(["plot", str(run_dir), "--out", str(tmp_path / "metrics.png")]) == 0
    assert (tmp_path / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.main(["plot", str(tmp_path / "nothing")]) == 2


@pytest.mark.parametrize("line", ['{"loss": 1.0}', '[5]', '{"step": 5'])
def test_plot_names_a_damaged_line(tmp_path, capsys, line):
    (tmp_path / "metrics.jsonl").write_text(f"{line}\n" + '{"step": 10, "loss": 2.0}\n')
    assert cli.main(["plot", str(tmp_path)]) == 2
    assert "metrics.jsonl:1 is not a JSON object with an integer step" in capsys.readouterr().err


def test_cli_dispatch(capsys):
    assert cli.main([]) == 0 and "train [CONFIG]" in capsys.readouterr().out
    assert cli.main(["fly"]) == 2 and "unknown command 'fly'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["prepare", "--help"])  # data_loader.prepare's own argument parser answers
    assert exit_info.value.code == 0 and "tokenizer" in capsys.readouterr().out


@pytest.mark.parametrize("training, world_size, expected", [
    ({}, 4, (32, 1, 32 * 256)),                                    # default: one micro-batch per rank
    ({"global_batch_sequences": 384, "micro_batch_size": 2}, 64, (384, 3, 384 * 256)),
    ({"global_batch_tokens": 1_572_864, "seq_len": 4096, "micro_batch_size": 2}, 192, (384, 1, 1_572_864)),
])
def test_plan_batch(training, world_size, expected):
    cfg = load_job_config(None, {f"training.{key}": value for key, value in training.items()})
    plan = plan_batch(cfg, world_size)
    assert (plan.global_batch_sequences, plan.grad_accum_steps, plan.tokens_per_step) == expected


@pytest.mark.parametrize("training, message", [
    ({"global_batch_sequences": 384, "micro_batch_size": 2}, r"384 sequences per step, which 128 processes"),
    ({"global_batch_tokens": 1000}, r"global_batch_tokens \(1000\) must be a multiple of training\.seq_len \(256\)"),
    ({"global_batch_tokens": 1024, "global_batch_sequences": 4}, r"set only one of"),
])
def test_plan_batch_rejects(training, message):
    cfg = load_job_config(None, {f"training.{key}": value for key, value in training.items()})
    with pytest.raises(ConfigError, match=message):
        plan_batch(cfg, 128)


def test_a_run_with_its_own_checkpoint_no_longer_needs_init_from(tmp_path):
    """A stage-2 run resumes from its own checkpoints even after stage 1's folder is gone;
    only a run with nothing of its own insists that init_from exists."""
    cfg = CheckpointConfig(init_from=str(tmp_path / "stage1-removed"))
    run_dir = tmp_path / "stage2"
    with pytest.raises(FileNotFoundError, match="checkpoint.init_from"):
        check_init_from(cfg, run_dir)
    write_checkpoint(run_dir / CHECKPOINTS_FOLDER / checkpoint_dir_name(7), {"model.w": torch.zeros(2)}, {"step": 7})
    check_init_from(cfg, run_dir)


def test_overlap_step_trains_the_same_run(corpus, tmp_path, monkeypatch):
    """The trainer's path through optimizer.overlap_step (the update unit by unit; on CPU without
    the stream) logs the same losses and gradient norms as the plain step, a skipped step
    included, and leaves the same checkpoint."""
    from fms_bamba.optim import UpdateBesideForward

    unit_steps = []
    step_unit = UpdateBesideForward._step_unit
    monkeypatch.setattr(UpdateBesideForward, "_step_unit", lambda self, groups: (unit_steps.append(1),
                                                                                 step_unit(self, groups)))
    runs = {}
    for overlap in (False, True):
        run_dir = tmp_path / f"overlap-{overlap}"
        train(load_job_config(None, tiny_overrides(run_dir, corpus, **{
            "training.steps": 6, "metrics.log_interval": 1, "checkpoint.interval": 6,
            "training.debug_nan_at_steps": [3], "optimizer.overlap_step": overlap})))
        runs[overlap] = run_dir
    preset = load_job_config(None, tiny_overrides(tmp_path, corpus)).model.preset
    assert len(unit_steps) == 6 * (1 + BambaConfig.from_preset(preset).n_layers)  # the root, then each block
    plain, overlapped = (read_metrics(runs[o]) for o in (False, True))
    assert [(r["loss"], r["grad_norm"]) for r in overlapped] == [(r["loss"], r["grad_norm"]) for r in plain]
    assert plain[2]["loss"] is None and plain[-1]["skipped_steps"] == 1
    final = [load_tensors(runs[o] / "checkpoints" / "step-00000006", prefix="") for o in (False, True)]
    assert final[0].keys() == final[1].keys()
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0] if not k.startswith("rng."))


def test_master_weights_run_resumes_exactly_and_saves_the_plain_layout(corpus, tmp_path):
    """optimizer.master_weights (bf16 model, fp32 masters in the optimizer; activation
    checkpointing on, whose wrapper renames parameters): a run resumed from its step-3 checkpoint
    ends with the same step-6 checkpoint, to the bit, as the uninterrupted run (it fails if the
    loaded masters do not reach the bf16 model); a run without the option continues from that
    checkpoint, and a run with it from a plain run's; its checkpoint has the plain run's keys,
    shapes and dtypes (fp32 weights and moments); and it trains like the fp32 run (the CPU
    computes in bf16 here, fp32 there)."""
    def run(run_dir: Path, master: bool) -> None:
        train(load_job_config(None, tiny_overrides(run_dir, corpus, **{
            "training.steps": 6, "metrics.log_interval": 1, "checkpoint.interval": 3, "checkpoint.keep_last": 2,
            "optimizer.master_weights": master, "parallelism.activation_checkpoint": "every-2"})))

    runs = {name: tmp_path / name for name in ("plain", "master")}
    for name, master in (("plain", False), ("master", True)):
        run(runs[name], master)
    resumed, as_plain, as_master = tmp_path / "resumed", tmp_path / "as_plain", tmp_path / "as_master"
    for run_dir, source, master in ((resumed, "master", True), (as_plain, "master", False), (as_master, "plain", True)):
        shutil.copytree(runs[source], run_dir)
        shutil.rmtree(run_dir / CHECKPOINTS_FOLDER / checkpoint_dir_name(6))
        run(run_dir, master)
    # Either kind of run continues from the other's checkpoint (the CPU computes in fp32 without masters).
    # (metrics.jsonl: the copied run's 6 records, then the continuation's steps 4-6)
    for run_dir, source in ((as_plain, "master"), (as_master, "plain")):
        assert [r["step"] for r in read_metrics(run_dir)[6:]] == [4, 5, 6]
        assert [r["loss"] for r in read_metrics(run_dir)[6:]] == \
               pytest.approx([r["loss"] for r in read_metrics(runs[source])[3:6]], rel=0.01)

    final = {name: load_tensors(run / CHECKPOINTS_FOLDER / checkpoint_dir_name(6), prefix="")
             for name, run in (*runs.items(), ("resumed", resumed))}
    assert all(torch.equal(final["master"][k], final["resumed"][k]) for k in final["master"] if not k.startswith("rng."))
    assert {k: (v.shape, v.dtype) for k, v in final["master"].items()} == \
           {k: (v.shape, v.dtype) for k, v in final["plain"].items()}
    assert final["master"]["model.output.weight"].dtype == torch.float32
    plain, master = (read_metrics(runs[name]) for name in ("plain", "master"))
    assert [r["loss"] for r in master] == pytest.approx([r["loss"] for r in plain], rel=0.02)
    assert master[-1]["loss"] < master[0]["loss"] - 0.5


def test_bfloat16_moments_resume_exactly_and_from_float32_moments(corpus, tmp_path):
    """optimizer.moments_dtype=bfloat16: the checkpoint holds the moments in bf16 (everything else
    as with float32 moments), a run resumed from its step-3 checkpoint ends at the same step-6
    bits as the uninterrupted run, a run continuing from float32 moments keeps bf16 ones (torch's
    load would make them fp32), and it trains like the float32 run."""
    def run(run_dir: Path, moments: str) -> None:
        train(load_job_config(None, tiny_overrides(run_dir, corpus, **{
            "training.steps": 6, "metrics.log_interval": 1, "checkpoint.interval": 3, "checkpoint.keep_last": 2,
            "optimizer.master_weights": True, "optimizer.moments_dtype": moments})))

    runs = {moments: tmp_path / moments for moments in ("float32", "bfloat16")}
    for moments, run_dir in runs.items():
        run(run_dir, moments)
    resumed, converted = tmp_path / "resumed", tmp_path / "converted"
    for run_dir, source in ((resumed, "bfloat16"), (converted, "float32")):
        shutil.copytree(runs[source], run_dir)
        shutil.rmtree(run_dir / CHECKPOINTS_FOLDER / checkpoint_dir_name(6))
        run(run_dir, "bfloat16")
    final = {name: load_tensors(run_dir / CHECKPOINTS_FOLDER / checkpoint_dir_name(6), prefix="")
             for name, run_dir in (*runs.items(), ("resumed", resumed), ("converted", converted))}
    assert all(torch.equal(final["bfloat16"][k], final["resumed"][k]) for k in final["bfloat16"] if not k.startswith("rng."))
    moments = [k for k in final["float32"] if k.endswith(("exp_avg", "exp_avg_sq"))]
    assert moments and final["float32"].keys() == final["bfloat16"].keys()
    for name in ("bfloat16", "converted"):
        assert {final[name][k].dtype for k in moments} == {torch.bfloat16}
        assert {k: v.dtype for k, v in final[name].items() if k not in moments} == \
               {k: v.dtype for k, v in final["float32"].items() if k not in moments}
    losses = {name: [r["loss"] for r in read_metrics(run_dir)] for name, run_dir in (*runs.items(), ("converted", converted))}
    assert losses["bfloat16"] != losses["float32"]
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=0.02)
    # its metrics.jsonl: the copied run's 6 records, then its own steps 4-6
    assert [r["step"] for r in read_metrics(converted)[6:]] == [4, 5, 6]
    assert losses["converted"][6:] == pytest.approx(losses["float32"][3:], rel=0.01)


def test_build_model_with_master_weights_keeps_bf16_shards_of_the_fp32_init():
    """With optimizer.master_weights the model's FSDP shards are bf16 and its masters fp32; the
    masters are the fp32 model's own initial weights, and the model's parameters them rounded."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from fms_bamba.parallel import build_mesh
    from fms_bamba.train import build_model, build_model_config

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        built = {}
        for masters in (False, True):
            cfg = load_job_config(None, {"model.preset": "tiny", "optimizer.master_weights": masters})
            built[masters] = build_model(build_model_config(cfg), build_mesh(cfg.parallelism, torch.device("cpu")),
                                         cfg, torch.device("cpu"))
    finally:
        dist.destroy_process_group()
    plain, _ = built[False]
    model, weights = built[True]
    assert weights is not model
    for (name, param), (_, master), (_, reference) in zip(model.named_parameters(), weights.named_parameters(),
                                                         plain.named_parameters()):
        assert isinstance(param, DTensor) and param.dtype == torch.bfloat16, name
        assert master.dtype == torch.float32 and torch.equal(master.full_tensor(), reference.full_tensor()), name
        assert torch.equal(param.full_tensor(), master.full_tensor().bfloat16()), name


def run_both_shardings(tmp_path: Path, corpus: Path, name: str, settings: dict, nproc: int = 2) -> dict[str, Path]:
    """The same `nproc`-process run under parallelism.sharding=fsdp2 and per-param."""
    runs = {}
    for sharding in ("fsdp2", "per-param"):
        runs[sharding] = tmp_path / f"{name}-{sharding}"
        torchrun(nproc, tiny_overrides(runs[sharding], corpus, **settings, **{"parallelism.sharding": sharding}))
    return runs


def assert_same_checkpoint(a: Path, b: Path) -> None:
    tensors_a, tensors_b = load_tensors(a, prefix=""), load_tensors(b, prefix="")
    assert tensors_a.keys() == tensors_b.keys()
    assert [k for k in tensors_a if not k.startswith("rng.") and not torch.equal(tensors_a[k], tensors_b[k])] == []


@pytest.mark.slow
def test_per_param_sharding_trains_as_fsdp2_to_the_bit(corpus, tmp_path):
    """parallelism.sharding=per-param over 2 ranks, with compiled blocks, bf16 shards and fp32
    masters, activation checkpointing, the last block kept gathered, the update beside the forward,
    and validation whose samples decode through the shards: every logged loss, gradient norm,
    val_loss and sample, and the final checkpoint (weights, moments) equal FSDP2's to the bit."""
    validation = {"validation.enable": True, "validation.interval": 4, "validation.batches": 2,
                  "validation.data.root": str(corpus), "validation.data.datasets": [default_corpus.DATASET_NAME],
                  "validation.prompts": ["def "], "validation.max_new_tokens": 3}
    runs = run_both_shardings(tmp_path, corpus, "masters", {
        "training.steps": 8, "metrics.log_interval": 2, "checkpoint.interval": 8, "parallelism.compile": True,
        "optimizer.master_weights": True, "parallelism.activation_checkpoint": "every-2",
        "parallelism.reshard_after_forward": "keep-last-1", "optimizer.overlap_step": True, **validation})
    fsdp2, per_param = (read_metrics(runs[s]) for s in ("fsdp2", "per-param"))
    keys = ("step", "loss", "grad_norm", "val_loss", "val_samples")
    assert [[r.get(k) for k in keys] for r in per_param] == [[r.get(k) for k in keys] for r in fsdp2]
    assert [r["step"] for r in fsdp2 if "val_samples" in r] == [4, 8]
    assert_same_checkpoint(*(runs[s] / CHECKPOINTS_FOLDER / checkpoint_dir_name(8) for s in ("fsdp2", "per-param")))


@pytest.mark.slow
def test_per_param_sharding_accumulates_and_resumes_fsdp2_checkpoints(corpus, tmp_path):
    """Two micro-batches per step and every block resharded after forward: per-param equals FSDP2
    to the bit, and a per-param run resumed from FSDP2's step-4 checkpoint ends at the same step 8."""
    settings = {"training.steps": 8, "metrics.log_interval": 2, "checkpoint.interval": 4,
                "training.global_batch_sequences": 16, "parallelism.reshard_after_forward": "always"}
    runs = run_both_shardings(tmp_path, corpus, "accumulation", settings)
    fsdp2, per_param = (read_metrics(runs[s]) for s in ("fsdp2", "per-param"))
    assert [(r["loss"], r["grad_norm"]) for r in per_param] == [(r["loss"], r["grad_norm"]) for r in fsdp2]
    resumed = tmp_path / "resumed"
    shutil.copytree(runs["fsdp2"], resumed)
    shutil.rmtree(resumed / CHECKPOINTS_FOLDER / checkpoint_dir_name(8))
    torchrun(2, tiny_overrides(resumed, corpus, **settings, **{"parallelism.sharding": "per-param"}))
    for run_dir in (runs["per-param"], resumed):
        assert_same_checkpoint(runs["fsdp2"] / CHECKPOINTS_FOLDER / checkpoint_dir_name(8),
                               run_dir / CHECKPOINTS_FOLDER / checkpoint_dir_name(8))


@pytest.mark.slow
def test_per_param_hsdp_trains_as_fsdp2_to_the_bit(corpus, tmp_path):
    """HSDP, 2 replicas x 2 shards (4 processes), 2 micro-batches per step (the replicas all-reduce
    once per step): per-param's losses, gradient norms and final checkpoint equal FSDP2's."""
    settings = {"training.steps": 6, "metrics.log_interval": 2, "checkpoint.interval": 6,
                "parallelism.dp_replicate": 2, "training.global_batch_sequences": 32}
    runs = run_both_shardings(tmp_path, corpus, "hsdp", settings, nproc=4)
    fsdp2, per_param = (read_metrics(runs[s]) for s in ("fsdp2", "per-param"))
    assert [(r["loss"], r["grad_norm"]) for r in per_param] == [(r["loss"], r["grad_norm"]) for r in fsdp2]
    assert_same_checkpoint(*(runs[s] / CHECKPOINTS_FOLDER / checkpoint_dir_name(6) for s in ("fsdp2", "per-param")))
