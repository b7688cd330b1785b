"""launch/torchrun.sh and launch/torchrun.py without Slurm: bad input fails fast with the reason,
an unreachable rendezvous times out, two "nodes" meet at a c10d rendezvous and train, and the
exit status tells a preempted run from a crash."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fms_bamba.preemption import EXIT_PREEMPTED

REPO = Path(__file__).resolve().parents[1]
TORCHRUN_SH = str(REPO / "launch" / "torchrun.sh")
TORCHRUN_PY = str(REPO / "launch" / "torchrun.py")

# A worker that behaves like the trainer towards signals: SIGUSR1 makes it stop with
# EXIT_PREEMPTED; a rank named in argv[2] instead exits with status 3 (a crash).
WORKER = """
import os, signal, sys, time
from pathlib import Path
from fms_bamba.preemption import EXIT_PREEMPTED
rank = os.environ["RANK"]
if rank == sys.argv[2]:
    sys.exit(3)
stop = []
signal.signal(signal.SIGUSR1, lambda signum, frame: stop.append(signum))
Path(sys.argv[1], "ready-" + rank).touch()
deadline = time.monotonic() + 60
while not stop and time.monotonic() < deadline:
    time.sleep(0.05)
sys.exit(EXIT_PREEMPTED if stop else 0)
"""


def _launch(*args: str, timeout_s: float = 60, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([TORCHRUN_SH, *args], env={**os.environ, **env}, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout_s)


def test_missing_config_fails_fast():
    done = _launch("configs/no-such-config.yaml", timeout_s=10, DEVICE="cpu")
    assert done.returncode == 2
    assert "config file not found: configs/no-such-config.yaml" in done.stderr


def test_no_config_is_a_usage_error():
    done = _launch(timeout_s=10)
    assert done.returncode == 2 and "usage: launch/torchrun.sh CONFIG" in done.stderr


def test_bad_process_count_is_named():
    done = _launch("configs/tiny.yaml", timeout_s=10, DEVICE="cpu", NPROC_PER_NODE="two")
    assert done.returncode == 2 and "NPROC_PER_NODE must be a positive integer, got 'two'" in done.stderr


def test_bad_device_is_named():
    done = _launch("configs/tiny.yaml", timeout_s=10, DEVICE="tpu")
    assert done.returncode == 2 and "DEVICE must be cuda or cpu, got 'tpu'" in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpus_asked_for_where_there_are_none():
    done = _launch("configs/tiny.yaml", timeout_s=30, DEVICE="cuda", NPROC_PER_NODE="2")
    assert done.returncode == 2
    assert "DEVICE=cuda but" in done.stderr and "has no GPU" in done.stderr


def test_several_nodes_need_a_rendezvous_endpoint():
    done = _launch("configs/tiny.yaml", timeout_s=10, DEVICE="cpu", NNODES="2")
    assert done.returncode == 2 and "NNODES=2 needs RDZV_ENDPOINT" in done.stderr


@pytest.mark.parametrize("args, reason", [
    (["configs/tiny.yaml", "configs/tiny.yaml"], "no '--' before the stage 2 config"),
    (["configs/tiny.yaml", "--"], "usage: launch/slurm/chain_stages.sh"),
    (["configs/tiny.yaml", "--", "configs/no-such-stage2.yaml"],
     "stage 2 config file not found: configs/no-such-stage2.yaml"),
    (["configs/tiny.yaml", "--training.stepz=3", "--", "configs/tiny.yaml"], "stage 1: "),
])
def test_chain_stages_rejects_bad_input_before_submitting(args, reason):
    done = subprocess.run([str(REPO / "launch" / "slurm" / "chain_stages.sh"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and reason in done.stderr


@pytest.mark.slow
def test_unreachable_rendezvous_times_out():
    start = time.monotonic()
    # 192.0.2.1 is reserved for documentation (RFC 5737): never this machine, never answering.
    done = _launch("configs/tiny.yaml", timeout_s=90, DEVICE="cpu", NPROC_PER_NODE="1", NNODES="2",
                   RDZV_ENDPOINT="192.0.2.1:29400", RDZV_TIMEOUT="1")
    assert done.returncode == 1
    assert "the rendezvous at 192.0.2.1:29400 failed" in done.stderr
    assert time.monotonic() - start < 60


@pytest.mark.slow
def test_two_nodes_meet_at_the_rendezvous_and_train(tmp_path):
    # Two launchers on this machine stand for two nodes of one process each: the c10d
    # rendezvous that train.sbatch sets up, hosted by the first "node".
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "DEVICE": "cpu", "NPROC_PER_NODE": "1", "NNODES": "2",
           "RDZV_ENDPOINT": f"127.0.0.1:{port}", "RDZV_ID": "two-nodes", "RDZV_TIMEOUT": "60"}
    run_dir = tmp_path / "run"
    command = [TORCHRUN_SH, "configs/tiny.yaml", f"--job.run_dir={run_dir}", "--training.steps=2",
               "--training.seq_len=64", "--training.micro_batch_size=2", "--lr_scheduler.warmup_steps=1",
               "--metrics.log_interval=1", "--metrics.progress_bar=false"]
    nodes = [subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    try:
        outputs = [node.communicate(timeout=180)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(outputs)
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    meta = json.loads((run_dir / "checkpoints" / "step-00000002" / "meta.json").read_text())
    assert meta["world_size"] == 2


def _signal_like_slurm(agent_pid: int, signum: int) -> None:
    """Signal the agent and each of its workers, as Slurm signals every process of a job step
    (torchrun starts each worker in a session of its own, so a process-group signal would not do)."""
    workers = [int(pid) for children in Path(f"/proc/{agent_pid}/task").glob("*/children")
               for pid in children.read_text().split()]
    for pid in (agent_pid, *workers):
        os.kill(pid, signum)


def _torchrun(tmp_path: Path, crash_rank: int | None, signal_workers: bool) -> int:
    """Run WORKER on 2 ranks under launch/torchrun.py; optionally send SIGUSR1 to every process."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    agent = subprocess.Popen([sys.executable, TORCHRUN_PY, "--standalone", "--nproc-per-node=2",
                              str(worker), str(tmp_path), str(crash_rank)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if signal_workers:
            deadline = time.monotonic() + 60
            while len(list(tmp_path.glob("ready-*"))) < 2:
                assert agent.poll() is None and time.monotonic() < deadline, "the workers did not start"
                time.sleep(0.1)
            _signal_like_slurm(agent.pid, signal.SIGUSR1)
        return agent.wait(timeout=60)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()


@pytest.mark.slow
def test_torchrun_exits_with_exit_preempted_when_the_workers_stopped_for_preemption(tmp_path):
    assert _torchrun(tmp_path, crash_rank=None, signal_workers=True) == EXIT_PREEMPTED


@pytest.mark.slow
def test_torchrun_exits_with_1_when_a_worker_crashed(tmp_path):
    # Rank 0 crashes; rank 1 is then stopped by the agent: not a preemption, not requeued.
    assert _torchrun(tmp_path, crash_rank=0, signal_workers=False) == 1
