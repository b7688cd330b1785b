"""End to end: `fms-bamba train` (tiny preset, seq 64, CPU, gloo) killed, preempted, relaunched on
other numbers of processes, and continued as a stage-2 run from another run's checkpoint.

Workers are started the way torchrun starts them (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT),
without torchrun's agent, so the test can signal one rank and read each rank's exit code.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
import torch

from data_loader import DataConfig, consumed_documents
from fms_bamba.checkpoint import CheckpointConfig, CheckpointManager, latest_complete_checkpoint, list_checkpoints, load_tensors, read_meta
from fms_bamba.preemption import EXIT_PREEMPTED

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
STEPS, INTERVAL = 8, 3
BOS, EOS = 0, 1


class Corpus:
    """One dataset of random documents (token ids 2..4095), and each document's length."""

    def __init__(self, root: Path, files: int = 2, documents: int = 200):
        self.root = root
        self.lengths: dict[tuple[str, int], int] = {}
        rng = np.random.default_rng(0)
        schema = pa.schema([("tokens", pa.uint32())])
        (root / "a").mkdir(parents=True)
        for number in range(files):
            file = f"part-{number}.arrow"
            with pa.OSFile(str(root / "a" / file), "wb") as sink, ipc.new_file(sink, schema) as writer:
                for index in range(documents):
                    tokens = rng.integers(2, 4096, int(rng.integers(5, 80))).astype(np.uint32)
                    writer.write_batch(pa.record_batch([pa.array(tokens)], schema=schema))
                    self.lengths[(file, index)] = len(tokens)

    def data_config(self) -> DataConfig:
        return DataConfig(root=str(self.root), datasets=["a"], num_workers=0, bos_token_id=BOS, eos_token_id=EOS)


def train_args(run_dir: Path, corpus: Corpus, **overrides) -> list[str]:
    options = {
        "job.run_dir": run_dir, "data.root": corpus.root, "data.datasets": "[a]", "data.num_workers": 0,
        "data.bos_token_id": BOS, "data.eos_token_id": EOS, "training.device": "cpu",
        "training.seq_len": 64, "training.micro_batch_size": 1, "training.global_batch_sequences": 6,
        "training.steps": STEPS, "lr_scheduler.warmup_steps": 2, "checkpoint.interval": INTERVAL,
        "checkpoint.keep_last": 0, "metrics.log_interval": 1, "metrics.progress_bar": False,
        **overrides,
    }
    return [str(REPO / "configs" / "tiny.yaml")] + [f"--{key}={value}" for key, value in options.items()]


class Job:
    """`fms-bamba train` on `world_size` local processes."""

    def __init__(self, world_size: int, args: list[str], log_dir: Path, *, sessions: bool = False):
        """sessions: each rank leads a process session (and group) of its own, with its children."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log_dir.mkdir(parents=True, exist_ok=True)
        self.logs = [log_dir / f"rank{rank}-{time.monotonic_ns()}.log" for rank in range(world_size)]
        self.procs = [
            subprocess.Popen(
                [sys.executable, "-m", "fms_bamba.cli", "train", *args],
                env={**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                     "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                     "OMP_NUM_THREADS": "1"},
                stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=REPO, start_new_session=sessions,
            )
            for rank, log in enumerate(self.logs)
        ]

    def wait(self, timeout: float = 120) -> list[int]:
        try:
            return [proc.wait(timeout=timeout) for proc in self.procs]
        finally:
            for proc in self.procs:
                if proc.poll() is None:
                    proc.kill()

    def signal(self, signum: int, ranks: list[int]) -> None:
        for rank in ranks:
            self.procs[rank].send_signal(signum)

    def signal_groups(self, signum: int) -> None:
        """Signal every process of every rank's group, children included, as Slurm signals a job step."""
        for proc in self.procs:
            os.killpg(proc.pid, signum)

    def groups_left(self, grace: float = 5.0) -> list[int]:
        """The ranks whose process group still has a live process (a child that outlived the rank;
        multiprocessing's resource tracker leaves when its rank has, within `grace` seconds)."""
        deadline = time.monotonic() + grace
        while True:
            groups = set()
            for stat in Path("/proc").glob("[0-9]*/stat"):
                try:
                    fields = stat.read_text().rsplit(")", 1)[1].split()
                except (OSError, IndexError):
                    continue
                if fields[0] != "Z":  # state; a zombie whose new parent does not reap it is gone
                    groups.add(int(fields[2]))  # pgrp
            left = [rank for rank, proc in enumerate(self.procs) if proc.pid in groups]
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.1)

    def output(self) -> str:
        return "\n".join(log.read_text() for log in self.logs)


def run(world_size: int, args: list[str], log_dir: Path) -> Job:
    job = Job(world_size, args, log_dir)
    codes = job.wait()
    assert codes == [0] * world_size, job.output()[-6000:]
    return job


def losses(run_dir: Path) -> dict[int, float]:
    """The loss of each step; a step re-run after a resume overwrites the earlier record."""
    return {record["step"]: record["loss"] for record in metrics(run_dir)}


def metrics(run_dir: Path) -> list[dict]:
    """The records of metrics.jsonl (without a line still being written)."""
    lines = (run_dir / "metrics.jsonl").read_text().split("\n")[:-1]
    return [json.loads(line) for line in lines]


def last_logged_step(run_dir: Path) -> int:
    return max(losses(run_dir), default=0) if (run_dir / "metrics.jsonl").exists() else 0


def wait_for_step(job: Job, run_dir: Path, step: int, timeout: float = 90) -> None:
    """Wait until `job` has logged `step` (or a later one)."""
    deadline = time.monotonic() + timeout
    while last_logged_step(run_dir) < step:
        assert time.monotonic() < deadline and all(p.poll() is None for p in job.procs), job.output()[-6000:]
        time.sleep(0.05)


def copy_run(source: Path, target: Path, up_to_step: int) -> None:
    """A copy of a run dir whose checkpoints end at `up_to_step`, as if it had stopped there."""
    shutil.copytree(source, target)
    for info in list_checkpoints(target):
        if info.step > up_to_step:
            shutil.rmtree(info.path)


def assert_consumed_like(corpus: Corpus, state: dict, reference: dict) -> None:
    """The loader's accounting: `state` consumed exactly what `reference` did, no document twice."""
    cfg = corpus.data_config()
    consumed = consumed_documents(cfg, state)
    assert consumed == consumed_documents(cfg, reference)
    assert all(tokens <= corpus.lengths[(ref.file, ref.document)] for ref, tokens in consumed.items())
    assert state["samples_seen"] == STEPS * 6


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    return Corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, corpus) -> Path:
    """An uninterrupted 2-process run: checkpoints at steps 3, 6 and 8."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run(2, train_args(run_dir, corpus), run_dir.parent / "logs")
    assert [c.step for c in list_checkpoints(run_dir)] == [3, 6, 8]
    return run_dir


def test_kill9_then_sigterm_then_relaunch_reproduces_uninterrupted_losses(tmp_path, corpus, reference_run):
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    args = train_args(run_dir, corpus)

    crashed = Job(2, args, logs)
    wait_for_step(crashed, run_dir, 4)  # between the checkpoints of steps 3 and 6
    crashed.signal(signal.SIGKILL, [0, 1])
    crashed.wait()
    killed_at = latest_complete_checkpoint(run_dir)
    assert killed_at is not None and read_meta(killed_at)["step"] in (3, 6)

    # The relaunches write asynchronously: a preemption save is committed before the exit too.
    args = train_args(run_dir, corpus, **{"checkpoint.async_mode": "async"})
    preempted = Job(2, args, logs)
    wait_for_step(preempted, run_dir, last_logged_step(run_dir) + 1)  # a step of this attempt
    preempted.signal(signal.SIGTERM, [1])  # one rank only: both must stop at the same step
    assert preempted.wait() == [EXIT_PREEMPTED, EXIT_PREEMPTED], preempted.output()[-6000:]
    stopped_at = max(losses(run_dir))
    assert stopped_at < STEPS
    assert read_meta(latest_complete_checkpoint(run_dir))["step"] == stopped_at
    assert "received SIGTERM" in preempted.output()

    run(2, args, logs)
    resumed, reference = losses(run_dir), losses(reference_run)
    # Exactly: same weights, moments, schedule position and data after every relaunch.
    assert resumed == reference, {step: (resumed.get(step), loss) for step, loss in reference.items()
                                  if resumed.get(step) != loss}
    assert read_meta(latest_complete_checkpoint(run_dir))["data_loader"] == \
        read_meta(latest_complete_checkpoint(reference_run))["data_loader"]


def test_async_process_saves_through_a_preemption_signal_sent_to_every_process(tmp_path, corpus):
    """checkpoint.async_mode=async_process: SIGTERM to every process of the job, DCP's checkpoint
    processes included (as Slurm signals a job step), once they exist; the ranks save the step they
    stop at through them, stop them, exit with EXIT_PREEMPTED, and the relaunch resumes there."""
    run_dir, logs, steps = tmp_path / "run", tmp_path / "logs", 16
    args = train_args(run_dir, corpus, **{"checkpoint.async_mode": "async_process", "training.steps": steps})
    preempted = Job(2, args, logs, sessions=True)
    deadline = time.monotonic() + 90
    while latest_complete_checkpoint(run_dir) is None:  # step 3, written by the daemons they spawned
        assert time.monotonic() < deadline and all(p.poll() is None for p in preempted.procs), preempted.output()[-6000:]
        time.sleep(0.05)
    preempted.signal_groups(signal.SIGTERM)
    assert preempted.wait() == [EXIT_PREEMPTED, EXIT_PREEMPTED], preempted.output()[-6000:]
    assert not preempted.groups_left()  # close() stopped the checkpoint processes
    stopped_at = max(losses(run_dir))
    assert 3 < stopped_at < steps
    assert read_meta(latest_complete_checkpoint(run_dir))["step"] == stopped_at
    assert "received SIGTERM" in preempted.output()

    run(2, args, logs)
    assert read_meta(latest_complete_checkpoint(run_dir))["step"] == steps
    assert [record["step"] for record in metrics(run_dir)] == list(range(1, steps + 1))  # on from stopped_at


def test_resume_on_1_then_3_processes_repeats_no_document(tmp_path, corpus, reference_run):
    reference_losses = losses(reference_run)
    reference_state = read_meta(latest_complete_checkpoint(reference_run))["data_loader"]

    one = tmp_path / "one"  # 2 -> 1: continue the reference run's step-3 checkpoint on one process
    copy_run(reference_run, one, up_to_step=3)
    run(1, train_args(one, corpus), tmp_path / "logs")
    final = read_meta(latest_complete_checkpoint(one))
    assert final["world_size"] == 1 and final["step"] == STEPS
    assert_consumed_like(corpus, final["data_loader"], reference_state)

    three = tmp_path / "three"  # 1 -> 3: continue the 1-process run's step-6 checkpoint on three
    copy_run(one, three, up_to_step=6)
    run(3, train_args(three, corpus), tmp_path / "logs")
    final = read_meta(latest_complete_checkpoint(three))
    assert final["world_size"] == 3 and final["step"] == STEPS
    assert_consumed_like(corpus, final["data_loader"], reference_state)
    # Same batches after the resharded resume: losses differ only by summation order.
    for resumed in (one, three):
        for step, loss in losses(resumed).items():
            assert loss == pytest.approx(reference_losses[step], rel=1e-4), (resumed.name, step)


def test_stage2_run_starts_at_its_own_schedule_with_fresh_data(tmp_path, corpus, reference_run):
    run_dir = tmp_path / "stage2"
    run(1, train_args(run_dir, corpus, **{
        "training.steps": 2, "optimizer.lr": 5e-4, "lr_scheduler.warmup_steps": 0, "lr_scheduler.min_lr": 1e-5,
        "checkpoint.init_from": reference_run, "checkpoint.init_load": "model+optimizer",
    }), tmp_path / "logs")
    records = metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["lr"] == pytest.approx(5e-4) and records[0]["tokens_seen"] == 6 * 64
    final = read_meta(latest_complete_checkpoint(run_dir))
    assert final["step"] == 2 and final["data_loader"]["samples_seen"] == 2 * 6
    # The stage-2 model started from the reference run's last weights: its first loss is the
    # reference model's loss on the first batch, below the reference run's first-step loss.
    assert records[0]["loss"] < losses(reference_run)[1]


def test_real_model_and_optimizer_load_resharded_with_new_schedule(reference_run):
    """In-process: the trainer's own model, optimizer and schedule take the 2-rank checkpoint."""
    from fms_bamba.config import LRSchedulerSection, OptimizerSection
    from fms_bamba.model import Bamba, BambaConfig
    from fms_bamba.optim import build_lr_scheduler, build_optimizer
    from fms_bamba.train import TrainerState

    model = Bamba(BambaConfig.from_preset("tiny"))
    model.init_weights()
    optimizer = build_optimizer(model, OptimizerSection(lr=5e-4))
    schedule = build_lr_scheduler(optimizer, LRSchedulerSection(warmup_steps=10), peak_lr=5e-4, total_steps=100)
    state = TrainerState()
    ckpt = CheckpointManager(CheckpointConfig(init_from=str(reference_run), init_load="model+optimizer"),
                             reference_run.parent / "in-process", model=model, optimizer=optimizer,
                             lr_scheduler=schedule, data_loader=None, trainer_state=state)
    assert ckpt.load()
    source = latest_complete_checkpoint(reference_run)
    saved = load_tensors(source, prefix="")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[f"model.{name}"]), name
    for name, param in model.named_parameters():
        assert torch.equal(optimizer.state[param]["exp_avg"], saved[f"optimizer.state.{name}.exp_avg"]), name
    assert {group["lr"] for group in optimizer.param_groups} == {schedule.current_lr()} == {5e-4 / 10}
    assert state.step == 0
