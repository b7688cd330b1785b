"""Checkpoint unit tests: a small FSDP2-wrapped model on 2 gloo ranks (this file is also the
torchrun worker), plus single-process tests of the offline readers, the restricted unpickler and
continued training."""

import logging
import os
import pickle
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from fms_bamba.checkpoint import (
    CheckpointConfig,
    CheckpointManager,
    UnsafeCheckpointError,
    check_init_from,
    iter_tensors,
    latest_complete_checkpoint,
    list_checkpoints,
    list_tensors,
    load_tensors,
    read_dcp_metadata,
    read_meta,
    write_checkpoint,
)


@dataclass
class Counters:
    """Stands in for the trainer's counters: any object with a JSON state_dict."""

    step: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0
    wandb_run_id: str = "run-a"

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


@dataclass
class Position:
    """Stands in for the data loader's state: documents consumed by the whole job."""

    consumed: int = 0

    def state_dict(self) -> dict:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = state["consumed"]


def build(lr: float = 1e-2, warmup: int = 4, seed: int = 0, fsdp: bool = False):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 5))  # 5 rows: uneven shards
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in (model[0], model[2]):
            fully_shard(layer)
        fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    return model, optimizer, scheduler, Position(), Counters()


def train_step(model, optimizer, scheduler, data, counters, rank: int = 0) -> float:
    torch.manual_seed(1000 + counters.step * 10 + rank)  # same batch whatever came before
    x = torch.randn(4, 16)
    loss = model(x).square().mean() + 1e-3 * torch.rand(()).item()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()
    counters.step += 1
    counters.tokens_seen += 64
    data.consumed += 8
    return loss.item()


def manager(run_dir, parts, **cfg) -> CheckpointManager:
    model, optimizer, scheduler, data, counters = parts
    return CheckpointManager(CheckpointConfig(**cfg), run_dir, model=model, optimizer=optimizer,
                             lr_scheduler=scheduler, data_loader=data, trainer_state=counters)


def full_state(model, optimizer) -> dict[str, torch.Tensor]:
    """Full (unsharded) model and optimizer tensors, comparable across world sizes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=False, flatten_optimizer_state_dict=True)
    state = {f"model.{k}": v for k, v in get_model_state_dict(model, options=options).items()}
    optim = get_optimizer_state_dict(model, optimizer, options=options)
    state.update({f"optimizer.{k}": v for k, v in optim.items() if isinstance(v, torch.Tensor)})
    return {k: v.detach().clone() for k, v in state.items()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


# --------------------------------------------------------------------------------------------
# The torchrun worker (2 gloo ranks): run with `python -m torch.distributed.run ... this_file run_dir`
# --------------------------------------------------------------------------------------------


def worker(run_dir: Path) -> None:
    import torch.distributed as dist

    from fms_bamba.preemption import PreemptionHandler

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    run_dir.mkdir(exist_ok=True)

    # 1. Save every 2 steps, keep 2; remember the state at each checkpoint.
    parts = build(fsdp=True)
    ckpt = manager(run_dir, parts, interval=2, keep_last=2)
    assert not ckpt.load()
    snapshots = {}
    for _ in range(8):
        train_step(*parts, rank=rank)
        step = parts[4].step
        ckpt.save(step)
        if step % 2 == 0:  # the draw right after a save is what a resume from it draws
            snapshots[step] = (full_state(*parts[:2]), torch.rand(3))
    ckpt.close()
    if rank == 0:
        kept = [c.path.name for c in list_checkpoints(run_dir)]
        assert kept == ["step-00000006", "step-00000008"], kept
        torch.save(snapshots[6][0], run_dir / "full_step6.pt")

    # 2. A fresh model resumes from step 8 exactly: weights, moments, schedule, counters, data, RNG.
    fresh = build(seed=1, fsdp=True)
    assert manager(run_dir, fresh, interval=2).load()
    assert_same(full_state(*fresh[:2]), snapshots[8][0])
    assert fresh[4].step == 8 and fresh[4].tokens_seen == 8 * 64 and fresh[3].consumed == 64
    assert fresh[2].last_epoch == parts[2].last_epoch
    assert fresh[1].param_groups[0]["lr"] == parts[1].param_groups[0]["lr"]
    assert torch.equal(torch.rand(3), snapshots[8][1])
    assert train_step(*fresh, rank=rank) == train_step(*parts, rank=rank)

    # 3. A truncated shard makes the newest checkpoint incomplete: resume falls back to step 6.
    dist.barrier()
    if rank == 0:
        shard = run_dir / "checkpoints" / "step-00000008" / "__1_0.distcp"
        shard.write_bytes(shard.read_bytes()[:100])
    dist.barrier()
    fallback = build(seed=2, fsdp=True)
    assert manager(run_dir, fallback).load()
    assert fallback[4].step == 6
    assert_same(full_state(*fallback[:2]), snapshots[6][0])

    # 4. Async: the write overlaps training and the checkpoint holds the weights at save time.
    async_parts = build(seed=3, fsdp=True)
    async_ckpt = manager(run_dir / "async", async_parts, interval=1, async_mode="async")
    train_step(*async_parts, rank=rank)
    before = full_state(*async_parts[:2])
    async_ckpt.save(1)
    train_step(*async_parts, rank=rank)  # its update waits for the copy into host memory
    async_ckpt.save(2)  # waits for the first write, commits it, starts the second
    async_ckpt.close()
    if rank == 0:
        assert [c.step for c in list_checkpoints(run_dir / "async") if c.complete] == [1, 2]
        saved = load_tensors(run_dir / "async" / "checkpoints" / "step-00000001", prefix="")
        assert_same({k: saved[k] for k in before}, before)

    # 4b. async_process on FSDP2 DTensors and the cpu gloo group: the daemon of each rank writes
    # both saves, the checkpoints hold the weights at save time and resume.
    from torch.distributed.checkpoint import _async_process_executor as dcp_process

    process_parts = build(seed=4, fsdp=True)
    process_ckpt = manager(run_dir / "process", process_parts, interval=1, async_mode="async_process")
    snapshots, daemons = {}, []
    for _ in range(2):
        train_step(*process_parts, rank=rank)
        step = process_parts[4].step
        snapshots[step] = full_state(*process_parts[:2])
        process_ckpt.save(step)
        train_step(*process_parts, rank=rank)  # its update waits for the copy into shared memory
        process_ckpt.wait_for_write()
        daemons.append([None, None])
        dist.all_gather_object(daemons[-1], dcp_process._CHECKPOINT_PROCESS._save_process.pid)
    assert daemons[0] == daemons[1] and len(set(daemons[0])) == 2  # one per rank, kept for the next save
    process_ckpt.close()
    assert dcp_process._CHECKPOINT_PROCESS is None
    if rank == 0:
        assert [c.step for c in list_checkpoints(run_dir / "process") if c.complete] == [1, 3]
        for step, snapshot in snapshots.items():
            saved = load_tensors(run_dir / "process" / "checkpoints" / f"step-0000000{step}", prefix="")
            assert_same({k: saved[k] for k in snapshot}, snapshot)
    resumed = build(seed=5, fsdp=True)
    assert manager(run_dir / "process", resumed).load()
    assert_same(full_state(*resumed[:2]), snapshots[3])
    assert resumed[4].step == 3

    # 5. A signal on one rank stops both at the same step boundary.
    preemption = PreemptionHandler()
    assert not preemption.stop_requested()
    if rank == 1:
        os.kill(os.getpid(), 15)
    assert preemption.stop_requested()
    preemption.close()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ckpt") / "run"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         __file__, str(run_dir)],
        capture_output=True, text=True, timeout=240,
        # The workers run this file as a script: the checkout's package first, not an installed one.
        env={**os.environ, "OMP_NUM_THREADS": "1",
             "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "skipping incomplete checkpoint" in result.stderr and "step-00000008" in result.stderr
    return run_dir


@pytest.mark.slow
def test_fsdp_save_resume_fallback_async_preemption(two_rank_run):
    """The worker's own assertions: resume is exact, a truncated checkpoint is skipped with a
    warning, keep_last prunes, async saves (thread and process) snapshot the weights, a signal
    stops every rank."""
    assert (two_rank_run / "full_step6.pt").exists()


# --------------------------------------------------------------------------------------------
# Offline readers and continued training, in this process (no process group)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_offline_reader_gives_full_tensors_of_sharded_checkpoint(two_rank_run):
    ckpt = two_rank_run / "checkpoints" / "step-00000006"
    meta = read_meta(ckpt)
    assert meta["step"] == 6 and meta["world_size"] == 2 and meta["trainer_state"]["tokens_seen"] == 6 * 64
    full = torch.load(two_rank_run / "full_step6.pt", weights_only=True)
    assert list_tensors(ckpt)["model.2.weight"] == (torch.Size([5, 16]), torch.float32)
    assert_same(load_tensors(ckpt), {k: v for k, v in full.items() if k.startswith("model.")})
    newest = list_checkpoints(two_rank_run)[-1]  # the one whose shard the worker truncated
    assert newest.step == 8 and not newest.complete and "__1_0.distcp" in newest.reason
    assert latest_complete_checkpoint(two_rank_run) == ckpt


@pytest.mark.slow
def test_stage2_load_resharded_to_one_process(two_rank_run):
    """model+optimizer from a 2-rank run into 1 process, fresh data and schedule: the lr is the new
    schedule's at step 0, the moments are the checkpoint's, the counters start at 0."""
    parts = build(lr=2e-5, warmup=10, seed=5)
    expected_lr = 2e-5 * 1 / 10
    assert parts[1].param_groups[0]["lr"] == pytest.approx(expected_lr)
    ckpt = manager(two_rank_run / "stage2", parts, init_from=str(two_rank_run), init_load="model+optimizer")
    assert ckpt.load()
    state = full_state(*parts[:2])
    source = two_rank_run / "checkpoints" / "step-00000006"
    assert_same({k: state[k] for k in state}, {k: t for k, t in iter_tensors(source, "", keys=list(state))})
    assert parts[1].param_groups[0]["lr"] == pytest.approx(expected_lr)
    assert parts[1].param_groups[0]["weight_decay"] == 0.1
    assert parts[4].step == 0 and parts[3].consumed == 0 and parts[2].last_epoch == 0
    train_step(*parts)
    assert parts[1].param_groups[0]["lr"] == pytest.approx(2e-5 * 2 / 10)


def test_init_keep_step_from_model_only_checkpoint_follows_schedule(tmp_path):
    source = build(seed=7)
    for _ in range(3):
        train_step(*source)
    tensors = {f"model.{k}": v for k, v in source[0].state_dict().items()}
    write_checkpoint(tmp_path / "imported" / "step-00000003", tensors, {
        "step": 3, "trainer_state": source[4].state_dict(), "lr_scheduler": source[2].state_dict()})
    parts = build(seed=8)
    parts[4].wandb_run_id = "run-b"
    ckpt = manager(tmp_path / "run", parts, init_from=str(tmp_path / "imported"), init_keep_step=True)
    assert ckpt.load()
    assert parts[4].step == 3 and parts[4].wandb_run_id == "run-b"
    assert parts[1].param_groups[0]["lr"] == source[1].param_groups[0]["lr"]  # 4th warmup step
    assert_same(parts[0].state_dict(), source[0].state_dict())
    assert not parts[1].state  # the optimizer was not in init_load


def test_resume_of_imported_model_only_checkpoint_warns_and_keeps_fresh_optimizer(tmp_path, caplog):
    source = build(seed=9)
    run_ckpts = tmp_path / "run" / "checkpoints"
    write_checkpoint(run_ckpts / "step-00000000", {f"model.{k}": v for k, v in source[0].state_dict().items()}, {})
    parts = build(seed=10)
    with caplog.at_level(logging.WARNING):
        assert manager(tmp_path / "run", parts).load()
    assert "no optimizer state" in caplog.text
    assert_same(parts[0].state_dict(), source[0].state_dict())
    assert parts[4].step == 0


def test_init_load_asking_for_missing_part_fails_clearly(tmp_path):
    write_checkpoint(tmp_path / "src" / "step-00000000",
                     {f"model.{k}": v for k, v in build()[0].state_dict().items()}, {})
    ckpt = manager(tmp_path / "run", build(), init_from=str(tmp_path / "src"), init_load="model+optimizer")
    with pytest.raises(ValueError, match="init_load needs optimizer state"):
        ckpt.load()


def test_an_update_waits_for_the_async_copy(tmp_path, monkeypatch):
    """The copy of an async save into host memory runs while training goes on; the optimizer's
    next update must wait for it, or the checkpoint would hold half-updated weights. A slowed
    copy makes the race certain."""
    from fms_bamba.staging import HostStager

    copy = HostStager._copy
    monkeypatch.setattr(HostStager, "_copy", lambda self, *a, **k: (time.sleep(0.5), copy(self, *a, **k))[1])
    parts = build(seed=13)
    ckpt = manager(tmp_path, parts, interval=1, async_mode="async")
    train_step(*parts)
    before = full_state(*parts[:2])
    ckpt.save(1)
    assert ckpt.staging is not None and not ckpt.staging.done()  # the save returned before the copy
    train_step(*parts)
    ckpt.close()
    assert not parts[1]._optimizer_step_pre_hooks  # closed: detached from the optimizer
    saved = load_tensors(tmp_path / "checkpoints" / "step-00000001", prefix="")
    assert_same({k: saved[k] for k in before}, before)


def test_async_saves_reuse_their_host_buffers(tmp_path):
    """Every async save after the first copies into the host buffers the first one allocated (on
    the GPU host, allocating and pinning them again at each save was what slowed training), and
    each checkpoint still holds the state of its own step."""
    parts = build(seed=14)
    ckpt = manager(tmp_path, parts, interval=1, async_mode="async")
    buffers, states = [], {}
    for step in (1, 2, 3):
        train_step(*parts)
        states[step] = {f"model.{k}": v.clone() for k, v in parts[0].state_dict().items()}
        ckpt.save(step)
        ckpt.wait_for_staging()
        buffers.append({k: b for k, b in ckpt.stager.buffers.items() if k.startswith(("model.", "optimizer."))})
    ckpt.close()
    assert len(buffers[0]) > len(states[1])
    assert all(later[k] is first for later in buffers[1:] for k, first in buffers[0].items())
    assert [c.step for c in list_checkpoints(tmp_path) if c.complete] == [1, 2, 3]
    for step in (1, 3):
        assert_same(load_tensors(tmp_path / "checkpoints" / f"step-{step:08d}", prefix="model."), states[step])


def test_async_commit_and_pruning_run_beside_training(tmp_path, monkeypatch):
    """Rank 0 commits an async save and deletes the checkpoints past keep_last on a thread of its
    own, so the training thread's save() calls never wait for them; close() waits, and the run
    ends with the newest checkpoint committed and the older one gone."""
    import threading

    import fms_bamba.checkpoint as checkpoint

    threads, release = [], threading.Event()
    commit = checkpoint._commit

    def slow_commit(*args):
        threads.append(threading.current_thread())
        assert release.wait(30)
        commit(*args)

    monkeypatch.setattr(checkpoint, "_commit", slow_commit)
    parts = build(seed=16)
    ckpt = manager(tmp_path, parts, interval=1, keep_last=1, async_mode="async")
    train_step(*parts)
    ckpt.save(1)
    for _ in range(20):  # the write finishes, then its commit waits on `release`
        if threads:
            break
        time.sleep(0.1)
    assert threads and threads[0] is not threading.main_thread()
    train_step(*parts)  # training goes on while rank 0 commits
    assert ckpt.writing and not (tmp_path / "checkpoints" / "step-00000001").exists()
    release.set()
    ckpt.wait_for_write()
    ckpt.save(2)
    ckpt.close()
    assert [c.step for c in list_checkpoints(tmp_path) if c.complete] == [2]  # step 1 pruned on that thread
    assert len(threads) == 2 and all(t is not threading.main_thread() for t in threads)


def test_host_buffers_made_at_the_start_serve_the_first_save(tmp_path):
    """prepare_staging allocates the async saves' host buffers before any save, without touching
    the optimizer (its step count stays 0), and the first save fills those same buffers with its
    own step's state. An optimizer without state yet is left alone: allocation waits for the
    first save, as DCP could only make the state by a step."""
    from fms_bamba.optim import init_adamw_state

    lazy = build(seed=15)
    ckpt = manager(tmp_path / "lazy", lazy, interval=1, async_mode="async")
    assert ckpt.prepare_staging() is None
    assert ckpt.stager is None and not lazy[1].state
    ckpt.close()

    parts = build(seed=15)
    init_adamw_state(parts[1])
    ckpt = manager(tmp_path / "run", parts, interval=1, async_mode="async")
    ckpt.prepare_staging().result()
    reserved = dict(ckpt.stager.buffers)
    assert {k for k in reserved if k.startswith("optimizer.state.")} and {k for k in reserved if k.startswith("model.")}
    assert all(state["step"].item() == 0 for state in parts[1].state.values())
    train_step(*parts)
    expected = full_state(*parts[:2])
    ckpt.save(1)
    ckpt.wait_for_staging()
    assert all(ckpt.stager.buffers[k] is buffer for k, buffer in reserved.items() if not k.startswith("rng."))
    ckpt.close()
    saved = load_tensors(tmp_path / "run" / "checkpoints" / "step-00000001", prefix="")
    assert_same({k: saved[k] for k in expected}, expected)


@pytest.fixture
def process_group():
    """A one-rank gloo group, as the trainer starts without torchrun."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_async_process_writes_in_a_daemon_that_outlives_preemption_signals(tmp_path, process_group):
    """async_process: DCP's checkpoint process, spawned by the first save, writes both; Slurm's
    preemption signals reach every process of the job, and the daemon must survive them to write
    the preemption save. close() stops it, and a second manager in the process starts another."""
    from torch.distributed.checkpoint import _async_process_executor as dcp_process

    parts = build(seed=15)
    ckpt = manager(tmp_path, parts, interval=1, async_mode="async_process")
    snapshots, daemons = {}, []
    for _ in range(2):
        train_step(*parts)
        step = parts[4].step
        snapshots[step] = full_state(*parts[:2])
        rng = torch.get_rng_state()
        ckpt.save(step)
        assert not signal.pthread_sigmask(signal.SIG_BLOCK, [])  # training still gets the signals
        next_loss = train_step(*parts)  # its update waits for the copy into shared memory
        ckpt.wait_for_write()
        daemons.append(dcp_process._CHECKPOINT_PROCESS._save_process)
        if step == 1:
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
                os.kill(daemons[0].pid, signum)
            time.sleep(0.2)
    assert daemons[1] is daemons[0] and daemons[0].is_alive()
    ckpt.close()
    assert dcp_process._CHECKPOINT_PROCESS is None and daemons[0].exitcode == 0
    assert [c.step for c in list_checkpoints(tmp_path) if c.complete] == [1, 3]
    for step, snapshot in snapshots.items():
        saved = load_tensors(tmp_path / "checkpoints" / f"step-0000000{step}", prefix="")
        assert_same({k: saved[k] for k in snapshot}, snapshot)

    resumed = build(seed=16)
    again = manager(tmp_path, resumed, interval=1, async_mode="async_process")
    assert again.load()
    assert_same(full_state(*resumed[:2]), snapshots[3])
    assert resumed[4].step == 3 and resumed[3].consumed == 3 * 8
    assert torch.equal(torch.get_rng_state(), rng)  # the rng state, a plain tensor, of step 3
    assert train_step(*resumed) == next_loss  # step 4 again, exactly
    again.save(resumed[4].step)
    again.close()
    assert [c.step for c in list_checkpoints(tmp_path) if c.complete] == [1, 3, 4]


def test_async_process_checks_shared_memory_and_raises_the_open_file_limit(tmp_path, process_group, monkeypatch):
    """Each staged tensor keeps a file descriptor open (twice while it is sent): a model with more
    tensors than the soft limit allows still saves. A /dev/shm without room is refused by name."""
    import resource
    import shutil

    torch.manual_seed(17)
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(150)])  # 300 parameters, 1,200 tensors saved
    optimizer = torch.optim.AdamW(model.parameters())
    parts = (model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), Position(), Counters())
    model(torch.randn(1, 2)).sum().backward()
    optimizer.step()

    real_disk_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real_disk_usage(path)._replace(free=10_000))
    with pytest.raises(RuntimeError, match=r"shared memory: .* /dev/shm has 0.00 GB free"):
        manager(tmp_path, parts, interval=1, async_mode="async_process").save(1)
    monkeypatch.undo()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip(f"hard open-file limit {hard}: too low to raise the soft one past the tensors")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        ckpt = manager(tmp_path, parts, interval=1, async_mode="async_process")
        ckpt.save(1)
        ckpt.close()
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert_same(load_tensors(tmp_path / "checkpoints" / "step-00000001"),
                {f"model.{k}": v for k, v in model.state_dict().items()})


def test_async_process_needs_a_process_group(tmp_path):
    with pytest.raises(ValueError, match="async_process needs torch.distributed initialised"):
        manager(tmp_path, build(), async_mode="async_process")


def test_single_process_save_resume_and_tmp_cleanup(tmp_path):
    parts = build(seed=11)
    ckpt = manager(tmp_path, parts, interval=3, keep_last=0)
    for _ in range(5):
        train_step(*parts)
        ckpt.save(parts[4].step, force=parts[4].step == 5)
    ckpt.close()
    stale = tmp_path / "checkpoints" / "step-00000009.tmp"
    stale.mkdir()
    assert [(c.step, c.complete) for c in list_checkpoints(tmp_path)] == [(3, True), (5, True), (9, False)]
    fresh = build(seed=12)
    assert manager(tmp_path, fresh).load()
    assert not stale.exists() and fresh[4].step == 5
    assert_same(full_state(*fresh[:2]), full_state(*parts[:2]))
    assert train_step(*fresh) == train_step(*parts)


class RefusingPosition(Position):
    """A data loader that cannot continue the saved state (as with another data.seed)."""

    def load_state_dict(self, state: dict) -> None:
        raise ValueError("data loader state: seed 0 differs from data.seed 1")


def test_a_refused_data_state_names_the_checkpoint(tmp_path):
    parts = build(seed=13)
    manager(tmp_path, parts, interval=1).save(1)
    model, optimizer, scheduler, _, counters = build(seed=14)
    resumed = manager(tmp_path, (model, optimizer, scheduler, RefusingPosition(), counters))
    with pytest.raises(ValueError, match=r"step-00000001/meta\.json: data loader state: seed 0 differs"):
        resumed.load()


def test_write_checkpoint_round_trip_and_incomplete_reasons(tmp_path):
    tensors = {"model.a": torch.arange(6.0).reshape(2, 3), "model.b": torch.ones(4, dtype=torch.bfloat16),
               "optimizer.x": torch.zeros(1)}
    ckpt = write_checkpoint(tmp_path / "step-00000004", tensors, {"step": 4})
    assert read_meta(ckpt)["step"] == 4 and read_meta(ckpt)["world_size"] == 1
    assert_same(load_tensors(ckpt), {k: v for k, v in tensors.items() if k.startswith("model.")})
    assert dict(iter_tensors(ckpt, keys=["model.b"]))["model.b"].dtype == torch.bfloat16
    with pytest.raises(KeyError, match="model.c"):
        list(iter_tensors(ckpt, keys=["model.c"]))
    (ckpt / "meta.json").write_text("{not json")
    assert "not valid JSON" in list_checkpoints(tmp_path)[0].reason
    (ckpt / "meta.json").unlink()
    assert "no meta.json" in list_checkpoints(tmp_path)[0].reason
    assert latest_complete_checkpoint(tmp_path) is None


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_restricted_unpickler_refuses_foreign_objects(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = write_checkpoint(tmp_path / "step-00000001", {"model.w": torch.zeros(2)}, {"step": 1})
    assert read_dcp_metadata(ckpt).state_dict_metadata["model.w"].size == (2,)
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to unpickle .*system"):
        load_tensors(ckpt)
    assert not (tmp_path / "pwned").exists()
    (ckpt / ".metadata").write_bytes(pickle.dumps({"not": "metadata"}))
    with pytest.raises(UnsafeCheckpointError, match="not DCP Metadata"):
        read_dcp_metadata(ckpt)


def test_metadata_pointing_outside_the_checkpoint_is_refused(tmp_path):
    ckpt = write_checkpoint(tmp_path / "step-00000001", {"model.w": torch.zeros(2)}, {"step": 1})
    metadata = read_dcp_metadata(ckpt)
    for item in metadata.storage_data.values():
        item.relative_path = "../../elsewhere.distcp"
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(UnsafeCheckpointError, match="elsewhere.distcp"):
        load_tensors(ckpt)


@pytest.mark.parametrize("field, value, message", [
    ("interval", 0, "checkpoint.interval"),
    ("keep_last", -1, "checkpoint.keep_last"),
    ("async_mode", "threads", r"checkpoint.async_mode must be one of \('disabled', 'async', 'async_process'\)"),
    ("init_load", "optimizer", "checkpoint.init_load"),
])
def test_config_errors_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        CheckpointConfig(**{field: value})


def test_init_from_without_checkpoint_fails_clearly_unless_the_run_resumes(tmp_path):
    nowhere, empty = CheckpointConfig(init_from=str(tmp_path / "nowhere")), CheckpointConfig(init_from=str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    for cfg, message in ((nowhere, "nowhere: no such"), (empty, "empty: holds no complete checkpoint")):
        with pytest.raises(FileNotFoundError, match=f"checkpoint.init_from: .*{message}"):
            check_init_from(cfg, tmp_path / "run")
        with pytest.raises(FileNotFoundError, match=f"checkpoint.init_from: .*{message}"):
            manager(tmp_path / "run", build(), init_from=cfg.init_from).load()
    manager(tmp_path / "run", build(), interval=1).save(1)
    check_init_from(nowhere, tmp_path / "run")  # the run resumes from its own checkpoint instead
    assert manager(tmp_path / "run", build(), init_from=nowhere.init_from).load()


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
