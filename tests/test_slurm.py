"""launch/slurm/train.sbatch on a real one-node Slurm cluster (installed here when missing):
a run that trains and checkpoints, a preempted run that requeues itself and resumes, and bad
input that fails fast with the reason in the job's log."""

import json
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from slurm_cluster import LocalSlurm, install_slurm

REPO = Path(__file__).resolve().parents[1]
SBATCH = "launch/slurm/train.sbatch"
# A small step of the tiny model, logged every step, so that a run is a few seconds of training.
SMALL_RUN = ["--training.seq_len=64", "--training.micro_batch_size=2", "--lr_scheduler.warmup_steps=1",
             "--metrics.log_interval=1", "--metrics.progress_bar=false"]

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = "a local Slurm cluster runs its daemons as root" if os.geteuid() != 0 else install_slurm()
    if reason:
        print(f"SKIPPED the Slurm tests: {reason}")
        pytest.skip(reason)
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _submit(slurm: LocalSlurm, tmp_path: Path, *args: str, **env: str) -> tuple[str, Path]:
    """Submit train.sbatch from the repository root on CPU with 2 processes; return (job id, log)."""
    job_env = {"DEVICE": "cpu", "NPROC_PER_NODE": "2", "RDZV_PORT": str(_free_port()), **env}
    job_id = slurm.submit(f"--output={tmp_path}/job-%j.out", SBATCH, *args, env=job_env, cwd=REPO)
    return job_id, tmp_path / f"job-{job_id}.out"


def _logged_steps(run_dir: Path) -> list[int]:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return []
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip()]


def _read(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else "(no log)"


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_chained_stages_train_checkpoint_and_hand_over(slurm, tmp_path):
    stage1_dir, stage2_dir = tmp_path / "stage1", tmp_path / "stage2"
    env = {**slurm.env, "DEVICE": "cpu", "NPROC_PER_NODE": "2", "RDZV_PORT": str(_free_port())}
    done = subprocess.run(
        ["launch/slurm/chain_stages.sh", f"--output={tmp_path}/job-%j.out",
         "configs/tiny.yaml", f"--job.run_dir={stage1_dir}", "--training.steps=4", "--checkpoint.interval=2",
         *SMALL_RUN, "--",
         "configs/tiny.yaml", f"--job.run_dir={stage2_dir}", "--training.steps=2", *SMALL_RUN],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    stage1_job, stage2_job = re.findall(r"stage \d: job (\d+)", done.stdout)
    log1, log2 = tmp_path / f"job-{stage1_job}.out", tmp_path / f"job-{stage2_job}.out"

    stage2 = slurm.wait_job(stage2_job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout_s=200)
    stage1 = slurm.job(stage1_job)
    assert stage1["JobState"] == "COMPLETED" and stage1["Restarts"] == "0", _read(log1)
    assert stage2["JobState"] == "COMPLETED", _read(log2)
    assert stage2["StartTime"] >= stage1["EndTime"]

    # Stage 1 trained, logged every step and checkpointed every 2 steps.
    first = _records(stage1_dir)
    assert [record["step"] for record in first] == [1, 2, 3, 4], _read(log1)
    assert all(record["tokens_seen"] > 0 and record["loss"] > 0 for record in first)
    for step in (2, 4):
        meta = json.loads((stage1_dir / "checkpoints" / f"step-{step:08d}" / "meta.json").read_text())
        assert meta["step"] == step and meta["world_size"] == 2

    # Stage 2 started at its own step 1 from stage 1's weights: on the same first batch (same data
    # seed) its loss is well below that of the freshly initialised stage 1.
    second = _records(stage2_dir)
    assert [record["step"] for record in second] == [1, 2], _read(log2)
    assert second[0]["loss"] < first[0]["loss"] - 0.3, (first[0], second[0])
    assert f"init_from: {stage1_dir}" in (stage2_dir / "config.yaml").read_text()


def test_preempted_job_saves_requeues_and_resumes(slurm, tmp_path):
    run_dir, steps = tmp_path / "run", 30
    # No periodic checkpoint: the only one before the end is the one the preemption signal makes.
    job_id, log = _submit(slurm, tmp_path, "configs/tiny.yaml", f"--job.run_dir={run_dir}",
                          f"--training.steps={steps}", "--checkpoint.interval=100000", *SMALL_RUN)
    deadline = time.monotonic() + 150
    while len(_logged_steps(run_dir)) < 2:
        assert slurm.job(job_id)["JobState"] in {"PENDING", "RUNNING"}, _read(log)
        assert time.monotonic() < deadline, f"job {job_id} logged no steps in time:\n{_read(log)}"
        time.sleep(0.2)
    slurm.run("scancel", "--signal=USR1", job_id)

    job = slurm.wait_job(job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout_s=180)
    text = _read(log)
    assert job["JobState"] == "COMPLETED", text
    assert job["Restarts"] == "1", text
    saved = sorted(int(path.name.removeprefix("step-")) for path in (run_dir / "checkpoints").glob("step-*"))
    assert len(saved) == 2 and 2 <= saved[0] < steps and saved[1] == steps, (saved, text)
    assert f"preempted: saved step {saved[0]}" in text
    assert "requeueing job" in text
    assert f"steps {saved[0] + 1}..{steps}" in text  # the requeued job starts after the saved step
    # The first attempt logged steps 1..saved, the requeued one saved+1..end: every step once.
    assert _logged_steps(run_dir) == list(range(1, steps + 1)), text


def test_missing_config_fails_fast_with_the_reason_in_the_log(slurm, tmp_path):
    job_id, log = _submit(slurm, tmp_path, "configs/no-such-config.yaml")
    job = slurm.wait_job(job_id, {"COMPLETED", "FAILED"}, timeout_s=30)
    assert job["JobState"] == "FAILED"
    assert "config file not found: configs/no-such-config.yaml" in _read(log)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpus_asked_for_where_there_are_none_fails_fast(slurm, tmp_path):
    job_id, log = _submit(slurm, tmp_path, "configs/tiny.yaml", GPUS_PER_NODE="1")
    job = slurm.wait_job(job_id, {"COMPLETED", "FAILED"}, timeout_s=60)
    assert job["JobState"] == "FAILED"
    assert "DEVICE=cuda but" in _read(log) and "has no GPU" in _read(log)
