"""Checkpoints: sharded torch.distributed.checkpoint (DCP) save with an atomic commit, automatic
resume, continued training from another run, and offline readers/writers for the tools.

On disk (docs/architecture.md, "Checkpoint on disk"):

    RUN_DIR/checkpoints/step-00000100.tmp/   while ranks write (never chosen by a load)
    RUN_DIR/checkpoints/step-00000100/       after the commit: .metadata, *.distcp, meta.json

Tensor state (keys "model.<fqn>", "optimizer.<flattened>", "rng.rank<r>.<source>") goes through DCP;
the JSON states (LR scheduler, data loader, trainer counters) and the size of every DCP file go
into meta.json, which rank 0 writes last. A directory whose meta.json is missing or whose files do
not have the recorded sizes is incomplete and never loaded.

DCP's `.metadata` file is a pickle: it is only ever read through `_SafeUnpickler`, which accepts
DCP's own metadata classes and nothing else, and DCP's byte items are read with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import logging
import multiprocessing.resource_tracker
import os
import pickle
import random
import re
import resource
import shutil
import signal
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import _async_process_executor as _dcp_process
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from fms_bamba.staging import HostStager, local_shard

logger = logging.getLogger(__name__)

CHECKPOINTS_FOLDER = "checkpoints"
"""The run dir's sub-directory of checkpoints; fixed, so every reader of a run dir finds them."""
META_FILE = "meta.json"
DCP_METADATA_FILE = ".metadata"
TMP_SUFFIX = ".tmp"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_OPTIM_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)

# What `init_load` takes from `init_from`; "data" is the data loader's position.
INIT_LOAD_PARTS = {
    "model": ("model",),
    "model+optimizer": ("model", "optimizer"),
    "model+optimizer+data": ("model", "optimizer", "data"),
}
ASYNC_MODES = ("disabled", "async", "async_process")


@dataclass
class CheckpointConfig:
    """The `checkpoint:` section of the job config."""

    enable: bool = True
    """Save checkpoints (resume and init_from work either way)."""
    interval: int = 100
    """Save every this many steps; also at the end of the run and on preemption."""
    keep_last: int = 3
    """Committed checkpoints to keep (older ones are deleted); 0 keeps all."""
    async_mode: str = "disabled"
    """Write mode: "disabled" (training waits for the write) | "async" (the write overlaps training,
    on a thread) | "async_process" (the same, written by a separate process)."""
    init_from: str = ""
    """When the run dir has no checkpoint: a checkpoint dir, or a run dir whose latest complete
    checkpoint is used, to start from."""
    init_load: str = "model"
    """What init_from supplies: "model" | "model+optimizer" | "model+optimizer+data"."""
    init_keep_step: bool = False
    """Keep init_from's step counter and LR-schedule position (else start at step 0)."""

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise ValueError(f"checkpoint.interval must be >= 1, got {self.interval}")
        if self.keep_last < 0:
            raise ValueError(f"checkpoint.keep_last must be >= 0 (0 keeps all), got {self.keep_last}")
        if self.async_mode not in ASYNC_MODES:
            raise ValueError(f"checkpoint.async_mode must be one of {ASYNC_MODES}, got {self.async_mode!r}")
        if self.init_load not in INIT_LOAD_PARTS:
            raise ValueError(
                f"checkpoint.init_load must be one of {tuple(INIT_LOAD_PARTS)}, got {self.init_load!r}"
            )


# --------------------------------------------------------------------------------------------
# Safe reading of DCP metadata
# --------------------------------------------------------------------------------------------


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint's `.metadata` pickle references something other than DCP's metadata types."""


_SAFE_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.filesystem", "_StoragePrefix"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
} | {("pathlib", name) for name in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")}


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, source: Path):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"{self.source}: refusing to unpickle {module}.{name}; a DCP metadata file only holds "
            "torch.distributed.checkpoint metadata types"
        )


def read_dcp_metadata(ckpt_dir: str | os.PathLike) -> Metadata:
    """DCP's `.metadata` of a checkpoint, unpickled with only DCP's metadata types allowed."""
    path = Path(ckpt_dir) / DCP_METADATA_FILE
    with open(path, "rb") as f:
        metadata = _SafeUnpickler(f, path).load()
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"{path}: holds a {type(metadata).__name__}, not DCP Metadata")
    for item in (metadata.storage_data or {}).values():  # data files must lie in the checkpoint dir
        relative = getattr(item, "relative_path", "")
        if not isinstance(relative, str) or Path(relative).name != relative or relative in ("", ".", ".."):
            raise UnsafeCheckpointError(f"{path}: data file {relative!r} is not a file of the checkpoint")
    return metadata


class _SafeReader(FileSystemReader):
    """DCP's file reader with the restricted metadata unpickler (and the metadata read once)."""

    def __init__(self, path: str | os.PathLike, metadata: Metadata | None = None):
        super().__init__(path)
        self._metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._metadata is None:
            self._metadata = read_dcp_metadata(self.path)
        return self._metadata


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, but byte items (optimizer hyper-parameters) load with weights_only.

    Our state dicts are flat ("model.<fqn>", ...) and hold no ShardedTensor, so DCP's flattening
    is off and byte items land directly in the dict that was passed to `dcp.load`.
    """

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        self.state_dict[read_item.dest_index.fqn] = torch.load(value, weights_only=True)


def _dcp_load(state: dict, ckpt_dir: Path, metadata: Metadata, *, distributed: bool) -> None:
    """Fill `state` in place from `ckpt_dir`, with the safe reader and planner."""
    with warnings.catch_warnings():  # single-process use is intended; DCP warns about it anyway
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.load(state, storage_reader=_SafeReader(ckpt_dir, metadata), planner=_SafeLoadPlanner(),
                 no_dist=not distributed)


def _dcp_save(state: dict, ckpt_dir: Path, *, distributed: bool) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.save(state, checkpoint_id=ckpt_dir, no_dist=not distributed)


# --------------------------------------------------------------------------------------------
# Offline helpers (no process group needed)
# --------------------------------------------------------------------------------------------


class CheckpointInfo(NamedTuple):
    step: int
    path: Path
    complete: bool
    reason: str
    """Why the checkpoint is incomplete ("" when complete)."""


def checkpoint_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _checkpoints_folder(path: Path) -> Path:
    """A run dir's checkpoints folder, or `path` itself when it is one."""
    return path / CHECKPOINTS_FOLDER if (path / CHECKPOINTS_FOLDER).is_dir() else path


def read_meta(ckpt_dir: str | os.PathLike) -> dict:
    """The checkpoint's meta.json (step, tokens_seen, world_size, JSON states, file sizes)."""
    path = Path(ckpt_dir) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no meta.json; not a committed checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int) or not isinstance(meta.get("files"), dict):
        raise ValueError(f"{path}: needs an integer 'step' and a 'files' table")
    return meta


def _incomplete_reason(ckpt_dir: Path) -> str:
    """Why `ckpt_dir` is not a complete checkpoint, or "" when it is."""
    if ckpt_dir.name.endswith(TMP_SUFFIX):
        return "never committed (still named .tmp)"
    try:
        meta = read_meta(ckpt_dir)
    except (OSError, ValueError) as e:
        return str(e)
    if DCP_METADATA_FILE not in meta["files"]:
        return f"{ckpt_dir / META_FILE}: records no {DCP_METADATA_FILE}"
    for name, size in meta["files"].items():
        file = ckpt_dir / name
        if not file.is_file():
            return f"{file}: missing"
        if file.stat().st_size != size:
            return f"{file}: {file.stat().st_size} bytes, meta.json records {size}"
    return ""


def list_checkpoints(path: str | os.PathLike) -> list[CheckpointInfo]:
    """Every checkpoint directory (committed or .tmp) of a run dir or checkpoints folder, by step."""
    folder = _checkpoints_folder(Path(path))
    found = []
    for child in folder.iterdir() if folder.is_dir() else ():
        match = _STEP_DIR.match(child.name.removesuffix(TMP_SUFFIX))
        if child.is_dir() and match:
            reason = _incomplete_reason(child)
            found.append(CheckpointInfo(int(match.group(1)), child, not reason, reason))
    return sorted(found, key=lambda c: (c.step, c.path.name))


def latest_complete_checkpoint(path: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run dir / checkpoints folder; warns about newer broken ones."""
    for info in reversed(list_checkpoints(path)):
        if info.complete:
            return info.path
        if not info.path.name.endswith(TMP_SUFFIX):
            logger.warning("skipping incomplete checkpoint %s: %s", info.path, info.reason)
    return None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint dir from a checkpoint dir, a run dir or a checkpoints folder; errors if none is complete."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint or run directory")
    if (path / META_FILE).exists():
        reason = _incomplete_reason(path)
        if reason:
            raise ValueError(f"{path}: incomplete checkpoint: {reason}")
        return path
    latest = latest_complete_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path}: holds no complete checkpoint")
    return latest


def list_tensors(ckpt_dir: str | os.PathLike, prefix: str = "model.") -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Shape and dtype of every full (unsharded) tensor whose key starts with `prefix`."""
    metadata = read_dcp_metadata(ckpt_dir)
    return {
        key: (entry.size, entry.properties.dtype)
        for key, entry in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(entry, TensorStorageMetadata)
    }


def iter_tensors(
    ckpt_dir: str | os.PathLike, prefix: str = "model.", keys: list[str] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, full tensor) one key at a time, so at most one tensor is held beyond the caller's."""
    ckpt_dir = Path(ckpt_dir)
    metadata = read_dcp_metadata(ckpt_dir)
    specs = {
        key: entry for key, entry in metadata.state_dict_metadata.items()
        if isinstance(entry, TensorStorageMetadata)
    }
    for key in keys if keys is not None else [k for k in specs if k.startswith(prefix)]:
        if key not in specs:
            raise KeyError(f"{ckpt_dir}: no tensor {key!r}")
        tensor = torch.empty(specs[key].size, dtype=specs[key].properties.dtype)
        _dcp_load({key: tensor}, ckpt_dir, metadata, distributed=False)
        yield key, tensor


def load_tensors(ckpt_dir: str | os.PathLike, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """Every full tensor whose key starts with `prefix` (keys keep the prefix)."""
    return dict(iter_tensors(ckpt_dir, prefix))


def _file_sizes(folder: Path) -> dict[str, int]:
    return {f.name: f.stat().st_size for f in sorted(folder.iterdir()) if f.is_file() and f.name != META_FILE}


def _commit(tmp_dir: Path, final_dir: Path, meta: dict) -> None:
    """Record the file sizes in meta.json (written last, fsynced), then rename .tmp -> final."""
    meta = {**meta, "files": _file_sizes(tmp_dir)}
    with open(tmp_dir / META_FILE, "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    if final_dir.exists():  # an uncommitted-looking leftover of an earlier attempt at this step
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)
    logger.info("committed checkpoint %s", final_dir)


def write_checkpoint(out_dir: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write a committed checkpoint from plain tensors (keys as in a checkpoint, e.g. "model.<fqn>").

    `meta` goes into meta.json (`step` defaults to 0, `world_size` to 1); a checkpoint with only
    "model." keys can be resumed or used with init_load=model.
    """
    out_dir = Path(out_dir)
    bad = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f"write_checkpoint({out_dir}): values must be tensors; not for {bad[:5]}")
    tmp_dir = out_dir.with_name(out_dir.name + TMP_SUFFIX)
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    tmp_dir.mkdir(parents=True)
    _dcp_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp_dir, distributed=False)
    _commit(tmp_dir, out_dir, {"step": 0, "tokens_seen": 0, "world_size": 1, **meta})
    return out_dir


# --------------------------------------------------------------------------------------------
# RNG state as tensors (JSON bytes for Python's and numpy's generators: no pickling)
# --------------------------------------------------------------------------------------------


def _json_tensor(obj: Any) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)


def _from_json_tensor(t: torch.Tensor) -> Any:
    return json.loads(bytes(t.tolist()).decode())


def _rng_state(rank: int) -> dict[str, torch.Tensor]:
    version, internal, gauss_next = random.getstate()
    algorithm, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": _json_tensor([version, list(internal), gauss_next]),
        "numpy": _json_tensor([algorithm, keys.tolist(), pos, has_gauss, cached]),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return {f"rng.rank{rank}.{source}": t for source, t in state.items()}


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    """Restore generators from `_rng_state`'s tensors, keyed by source ("torch", "python", ...)."""
    for source, t in state.items():
        if source == "torch":
            torch.set_rng_state(t)
        elif source == "cuda" and torch.cuda.is_available():
            torch.cuda.set_rng_state(t)
        elif source == "python":
            version, internal, gauss_next = _from_json_tensor(t)
            random.setstate((version, tuple(internal), gauss_next))
        elif source == "numpy":
            algorithm, keys, pos, has_gauss, cached = _from_json_tensor(t)
            np.random.set_state((algorithm, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# --------------------------------------------------------------------------------------------
# async_process: DCP's checkpoint process
# --------------------------------------------------------------------------------------------

# DCP spawns its checkpoint process (a daemon, `_CHECKPOINT_PROCESS` of the module imported as
# _dcp_process) at the first process-based async_save, forms a gloo group of the daemons of all
# ranks, and keeps it until the interpreter exits. What it needs from us:
#  - a process group: its rendezvous is set up over the group passed to async_save (without one,
#    async_save fails in `dist.get_rank`), so async_process needs torch.distributed initialised;
#  - to be stopped by close(): it keeps the last request's state dict, i.e. every staged shared
#    buffer stays mapped (the whole checkpoint in /dev/shm) until its next request;
#  - to survive the preemption signals (below);
#  - /dev/shm room for the staged state, and a file descriptor per staged tensor (below).

# The signals fms_bamba.preemption turns into a save. Slurm delivers a job step's signals to every
# process of the step, and Ctrl-C reaches the terminal's whole foreground process group: the
# daemon, which has no handler for them, would die of the signal, and the save it asks for would
# fail (BrokenPipeError).
_PREEMPTION_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGUSR1}


@contextlib.contextmanager
def _threads_started_here_block_preemption_signals() -> Iterator[None]:
    """Block the preemption signals in this thread for the duration: threads started meanwhile
    keep the mask, and so do processes they spawn (the mask survives fork and exec).

    DCP spawns its daemon from a thread that async_save starts, so the daemon never acts on these
    signals (they stay pending); it is stopped through its pipe or SIGKILL (_stop_checkpoint_process).
    This thread's mask is restored on exit; a signal sent meanwhile is handled then, not lost. The
    same trick keeps Python's multiprocessing resource tracker alive through Ctrl-C; started here
    first, so that its launch (which unblocks SIGINT and SIGTERM in the launching thread) does not
    undo the mask in DCP's thread.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _PREEMPTION_SIGNALS)
    try:
        multiprocessing.resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, _PREEMPTION_SIGNALS)
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _stop_checkpoint_process(timeout: float = 60.0) -> None:
    """Stop DCP's checkpoint process of this rank, if running; the next process-based save spawns
    another. Called with no write in flight (a request still in the pipe is waited for)."""
    process, _dcp_process._CHECKPOINT_PROCESS = _dcp_process._CHECKPOINT_PROCESS, None
    if process is None:
        return
    daemon = process._save_process
    if daemon.is_alive():
        with contextlib.suppress(OSError):  # its end of the pipe is already gone
            process._send(_dcp_process._CheckpointSaveProcessControlOpts.TERMINATE)
        daemon.join(timeout)
    if daemon.is_alive():  # it blocks SIGTERM, so torch's own terminate() would not stop it
        logger.warning("checkpoint process %d did not stop within %.0fs; killing it", daemon.pid, timeout)
        daemon.kill()
        daemon.join()


# At exit without close() (an error, a second Ctrl-C): a write in flight has finished by then (the
# interpreter joins DCP's thread first), and this runs before multiprocessing's own exit handler
# (registered at its import, above), whose terminate()-then-join would wait forever on a daemon
# that blocks SIGTERM.
atexit.register(_stop_checkpoint_process, 10.0)


def _prepare_shared_staging(state: dict[str, Any]) -> None:
    """Check this host can stage `state` in shared memory, before the first async_process save.

    The buffers live in /dev/shm, which all ranks of the host share: without room for them, the
    copy of whichever rank allocates last fails (No space left on device), at the update after
    the first save (a container's default /dev/shm is 64 MB); checked here, every rank fails alike
    with the remedy. And each buffer keeps a file descriptor open in this process and in the
    daemon, and sending the state to the daemon dups each once more: with
    thousands of tensors (Bamba-9B's model and AdamW state: about 1,600 per rank) the usual soft
    limit of 1024 open files is too low; it is raised to the hard limit, which the daemon inherits.
    """
    # HostStager's buffers: one per tensor of the state, each its own shared-memory file.
    sizes = [local_shard(value).nbytes for value in state.values() if isinstance(value, torch.Tensor)]
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    needed = sum(sizes) * local_ranks
    if os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free < needed:
        raise RuntimeError(
            f"checkpoint.async_mode=async_process stages the checkpoint in shared memory: "
            f"{needed / 1e9:.2f} GB for the {local_ranks} rank(s) of this host, but /dev/shm has "
            f"{shutil.disk_usage('/dev/shm').free / 1e9:.2f} GB free (in a container, raise its --shm-size); "
            "async_mode=async stages into ordinary host memory")

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = len(os.listdir("/proc/self/fd")) + 2 * len(sizes) + 256 if os.path.isdir("/proc/self/fd") else 0
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    if hard != resource.RLIM_INFINITY and hard < wanted:
        raise RuntimeError(
            f"checkpoint.async_mode=async_process keeps a file descriptor open per staged tensor "
            f"({len(sizes)}), in this process and the checkpoint process: about {wanted} open files are "
            f"needed, the hard limit (ulimit -Hn) is {hard}; raise it, or use async_mode=async")
    new_soft = hard if hard != resource.RLIM_INFINITY else wanted
    resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
    logger.info("checkpoint: open-file limit raised from %d to %d for %d tensors in shared memory",
                soft, new_soft, len(sizes))


# --------------------------------------------------------------------------------------------
# The trainer's manager
# --------------------------------------------------------------------------------------------


def _strip(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The entries of `state` under `prefix`, with the prefix removed."""
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def _json_state(name: str, obj: Any) -> Any:
    state = obj.state_dict()
    try:
        json.dumps(state)
    except TypeError as e:
        raise TypeError(f"checkpoint: {name}.state_dict() must be JSON-serialisable ({e})") from None
    return state


def _init_from_checkpoint(init_from: str) -> Path:
    try:
        return resolve_checkpoint(init_from)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"checkpoint.init_from: {e}") from None


def check_init_from(cfg: CheckpointConfig, run_dir: str | os.PathLike) -> None:
    """Raise FileNotFoundError naming checkpoint.init_from if a run with no checkpoint of its own
    would start from an init_from that holds no complete checkpoint. Only reads the file system:
    call it before building anything."""
    if cfg.init_from and latest_complete_checkpoint(Path(run_dir) / CHECKPOINTS_FOLDER) is None:
        _init_from_checkpoint(cfg.init_from)


class CheckpointManager:
    """Saves, commits, prunes and loads the run's checkpoints. All ranks call every method.

    `model` is the module whose parameters are the weights of record: the model, or the fp32
    masters (`fms_bamba.optim.master_weights`) that the optimizer's param groups hold."""

    def __init__(
        self,
        cfg: CheckpointConfig,
        run_dir: str | os.PathLike,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Any,
        data_loader: Any,
        trainer_state: Any,
        job_config: dict | None = None,
    ):
        self.cfg = cfg
        self.folder = Path(run_dir) / CHECKPOINTS_FOLDER
        self.model, self.optimizer, self.lr_scheduler = model, optimizer, lr_scheduler
        self.data_loader, self.trainer_state = data_loader, trainer_state
        self.job_config = job_config  # the resolved config as plain data, kept in meta.json
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        # A CPU group for barriers and async saves, so neither syncs the GPU stream (as torchtitan).
        self.cpu_group = dist.new_group(backend="gloo") if self.distributed else None
        self.pending: Future | None = None  # an async save's write; on rank 0, then its commit and pruning
        self.committer: ThreadPoolExecutor | None = None  # rank 0's thread for those (`_commit_after`)
        self.stager: HostStager | None = None  # async modes' copy into host memory (`_stager`)
        self.staging: Future | None = None  # the copy of an async save into host memory, while it runs
        self.staging_hook = None
        if cfg.enable and cfg.async_mode == "async_process" and not self.distributed:
            raise ValueError("checkpoint.async_mode=async_process needs torch.distributed initialised (the "
                             "trainer always is): DCP's checkpoint process forms its group from the training "
                             "processes' group")
        if cfg.enable and cfg.async_mode != "disabled":
            # The copy runs beside the next forward and backward; only an update must wait for it.
            self.staging_hook = optimizer.register_step_pre_hook(lambda *_: self.wait_for_staging())
        self.last_saved_step = -1

    # ---- save -------------------------------------------------------------------------------

    def save(self, step: int, *, force: bool = False) -> None:
        """Save when `step % interval == 0` or `force`; collective."""
        if not self.cfg.enable:
            return
        self._commit_pending(wait=False)
        if not (force or step % self.cfg.interval == 0) or step == self.last_saved_step:
            return
        self._commit_pending(wait=True)  # one write in flight at a time
        tmp_dir = self.folder / (checkpoint_dir_name(step) + TMP_SUFFIX)
        final_dir = self.folder / checkpoint_dir_name(step)
        meta = self._meta(step)
        state = self._tensor_state()
        process = self.cfg.async_mode == "async_process"
        if self.rank == 0:
            if tmp_dir.exists():  # left by a run killed while writing this step
                shutil.rmtree(tmp_dir)
            tmp_dir.mkdir(parents=True)
        self._barrier()
        start = time.perf_counter()
        if self.cfg.async_mode != "disabled":
            # "async" writes on a thread of this process; "async_process" hands the staged state
            # to DCP's checkpoint process (spawned at the first save, kept for the next; a gloo
            # group of its own), which writes it with its own interpreter; the buffers are in
            # shared memory, so nothing is copied on the way. With the buffers kept from one save
            # to the next, a save cost Bamba-9B 3.6 s of training that way (docs/performance.md).
            stager = self._stager(state)
            if torch.cuda.is_available():  # the staging stream must copy this step's update (on any stream)
                torch.cuda.synchronize()
            spawns = process and _dcp_process._CHECKPOINT_PROCESS is None  # this save starts the daemon
            with _threads_started_here_block_preemption_signals() if spawns else contextlib.nullcontext():
                response = dcp.async_save(state, checkpoint_id=tmp_dir, process_group=self.cpu_group,
                                          async_stager=stager, no_dist=not self.distributed,
                                          async_checkpointer_type=AsyncCheckpointerType.PROCESS if process
                                          else AsyncCheckpointerType.THREAD)
            self.staging = response.staging_completion
            self.pending = response.upload_completion
            if self.rank == 0:
                if self.committer is None:
                    self.committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-commit")
                self.pending = self.committer.submit(self._commit_after, self.pending, tmp_dir, final_dir, meta)
                logger.info("checkpoint step %d: training blocked %.2fs starting the async save",
                            step, time.perf_counter() - start)
        else:
            _dcp_save(state, tmp_dir, distributed=self.distributed)
            # DCP's final gather already follows every rank's write; the barrier makes it explicit.
            self._barrier()
            if self.rank == 0:
                _commit(tmp_dir, final_dir, meta)
                self._prune()
                logger.info("checkpoint step %d: saved in %.2fs", step, time.perf_counter() - start)
        self.last_saved_step = step

    def prepare_staging(self) -> Future | None:
        """Start allocating, on the stager's thread, the host memory async saves copy the state
        into; collective. Returns the allocation's Future (the first save waits for it anyway), or
        None without an async mode. Pinning that memory is slow and slows the steps beside it:
        here it overlaps the first step's compilation rather than the steps of the first save."""
        # An optimizer whose state is made lazily, at its first step, would get it here from DCP
        # by a step at lr 0, which counts in AdamW's bias correction: such a run allocates at its
        # first save instead (build_optimizer's AdamW has its state from the start).
        if not (self.cfg.enable and self.cfg.async_mode != "disabled" and self.optimizer.state):
            return None
        state = self._tensor_state()
        return self._stager(state).reserve(state)

    def _stager(self, state: dict[str, Any]) -> HostStager:
        """The async modes' stager, made for `state` the first time (checking /dev/shm and the
        open-file limit first for async_process); collective then."""
        if self.stager is None:
            process = self.cfg.async_mode == "async_process"
            if process:
                _prepare_shared_staging(state)
                self._barrier()  # every rank checked /dev/shm before any allocates in it
            self.stager = HostStager(shared=process)
        return self.stager

    def wait_for_staging(self) -> None:
        """Block until an async save's copy into host memory is done (before weights change)."""
        if self.staging is None:
            return
        if not self.staging.done():
            start = time.perf_counter()
            self.staging.result()
            if self.rank == 0:
                logger.info("checkpoint: the update waited %.2fs for the async save's copy into host memory",
                            time.perf_counter() - start)
        self.staging.result()  # raises the copy's error, if any
        self.staging = None

    @property
    def writing(self) -> bool:
        """An async save of this rank is still being written."""
        return self.pending is not None and not self.pending.done()

    def wait_for_write(self) -> None:
        """Wait for an async save in flight and commit it, keeping the host buffers; collective."""
        self._commit_pending(wait=True)

    def close(self) -> None:
        """Wait for an async save in flight, commit it, free the host buffers (stopping the
        checkpoint process of async_process) and detach from the optimizer; collective."""
        self._commit_pending(wait=True)
        if self.committer is not None:
            self.committer.shutdown()
            self.committer = None
        if self.cfg.async_mode == "async_process":
            _stop_checkpoint_process()
        if self.stager is not None:
            self.stager.close()
            self.stager = None
        if self.staging_hook is not None:
            self.staging_hook.remove()
            self.staging_hook = None

    def _commit_pending(self, *, wait: bool) -> None:
        """Finish with the async save in flight once it is done (raising its error, if any); with
        `wait`, block until it is."""
        if self.pending is None or not (wait or self.pending.done()):
            return
        self.pending.result()
        self.pending = None

    def _commit_after(self, write: Future, tmp_dir: Path, final_dir: Path, meta: dict) -> None:
        """Rank 0, on its commit thread: once the write is done, commit and prune. Not on the
        training thread, where the fsync and the deletion of an old checkpoint (GBs of files)
        stall a step, and every rank waits for rank 0 at the next collective: on one H200 the
        10 steps with bamba-1b's commit and pruning there ran 4.7 s slower (docs/performance.md)."""
        write.result()  # rank 0's completes after DCP's final gather, i.e. after every rank wrote
        _commit(tmp_dir, final_dir, meta)
        self._prune()

    def _meta(self, step: int) -> dict:
        trainer_state = _json_state("trainer_state", self.trainer_state)
        return {
            "step": step,
            "tokens_seen": trainer_state.get("tokens_seen"),
            "world_size": self.world_size,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "trainer_state": trainer_state,
            "lr_scheduler": _json_state("lr_scheduler", self.lr_scheduler),
            "data_loader": _json_state("data_loader", self.data_loader),
            "config": self.job_config,
        }

    def _tensor_state(self) -> dict[str, torch.Tensor]:
        state = {f"model.{k}": v for k, v in get_model_state_dict(self.model).items()}
        optim = get_optimizer_state_dict(self.model, self.optimizer, options=_OPTIM_OPTIONS)
        state.update({f"optimizer.{k}": v for k, v in optim.items()})
        state.update(_rng_state(self.rank))
        return state

    def _prune(self) -> None:
        if self.cfg.keep_last == 0:
            return
        checkpoints = [c for c in list_checkpoints(self.folder) if not c.path.name.endswith(TMP_SUFFIX)]
        complete = [c for c in checkpoints if c.complete]
        if len(complete) <= self.cfg.keep_last:
            return
        oldest_kept = complete[-self.cfg.keep_last].step
        for c in checkpoints:
            if c.step < oldest_kept:
                shutil.rmtree(c.path, ignore_errors=True)
                logger.info("deleted old checkpoint %s", c.path)

    def _barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.cpu_group)

    # ---- load -------------------------------------------------------------------------------

    def load(self) -> bool:
        """Resume from the run's latest complete checkpoint, else start from init_from; collective.

        Returns False when nothing was loaded (a fresh run).
        """
        choice: list = [None]  # rank 0's (checkpoint, resume?) or error, which every rank follows
        if self.rank == 0:
            for stale in self.folder.glob(f"step-*{TMP_SUFFIX}"):
                logger.warning("removing uncommitted checkpoint %s", stale)
                shutil.rmtree(stale, ignore_errors=True)
            latest = latest_complete_checkpoint(self.folder)
            if latest is not None:
                choice = [(str(latest), True)]
            elif self.cfg.init_from:
                try:
                    choice = [(str(_init_from_checkpoint(self.cfg.init_from)), False)]
                except FileNotFoundError as e:
                    choice = [str(e)]
        if self.distributed:
            dist.broadcast_object_list(choice, src=0, group=self.cpu_group)
        if isinstance(choice[0], str):
            raise FileNotFoundError(choice[0])
        if choice[0] is None:
            return False
        path, resume = choice[0]
        if self.rank == 0:
            logger.info("resuming from %s" if resume else "initialising from %s", path)
        if resume:
            self._load(Path(path), parts=("model", "optimizer", "data"), keep_step=True, resume=True)
        else:
            self._load(Path(path), parts=INIT_LOAD_PARTS[self.cfg.init_load],
                       keep_step=self.cfg.init_keep_step, resume=False)
        return True

    def _load(self, ckpt: Path, *, parts: tuple[str, ...], keep_step: bool, resume: bool) -> None:
        """Load `parts` of `ckpt`, and its step/schedule if `keep_step`.

        On resume a part the checkpoint lacks (e.g. one written by `bamba-ckpt import-hf`) starts
        fresh with a warning; from init_from it is an error. RNG states come back only when the
        run continues exactly (resume, or everything from init_from with its step kept).
        """
        metadata = read_dcp_metadata(ckpt)
        meta = read_meta(ckpt)
        saved = metadata.state_dict_metadata

        def absent(what: str, field: str) -> None:
            if not resume:
                raise ValueError(f"{ckpt}: checkpoint.{field} needs {what}, which the checkpoint lacks")
            logger.warning("%s has no %s; it starts fresh", ckpt, what)

        model_state = get_model_state_dict(self.model)
        unsaved = [k for k in model_state if f"model.{k}" not in saved]
        if unsaved:
            raise ValueError(f"{ckpt}: no tensors for model parameters {unsaved[:5]} ({len(unsaved)} missing)")
        state = {f"model.{k}": v for k, v in model_state.items()}
        load_optimizer = "optimizer" in parts and any(k.startswith("optimizer.") for k in saved)
        if "optimizer" in parts and not load_optimizer:
            absent("optimizer state", "init_load")
        if load_optimizer:
            optim_state = get_optimizer_state_dict(self.model, self.optimizer, options=_OPTIM_OPTIONS)
            state.update({f"optimizer.{k}": v for k, v in optim_state.items()})
        load_rng = resume or (keep_step and parts == INIT_LOAD_PARTS["model+optimizer+data"])
        if load_rng:
            state.update({k: torch.empty(saved[k].size, dtype=saved[k].properties.dtype)
                          for k in saved if k.startswith(f"rng.rank{self.rank}.")})

        _dcp_load(state, ckpt, metadata, distributed=self.distributed)

        set_model_state_dict(self.model, _strip(state, "model."))
        if load_optimizer:
            # A fresh schedule takes every hyper-parameter (lr first) from this run's config; only
            # the moments and their step counts come from the checkpoint.
            fresh_groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
            set_optimizer_state_dict(self.model, self.optimizer, _strip(state, "optimizer."), options=_OPTIM_OPTIONS)
            if not keep_step:
                for group, fresh in zip(self.optimizer.param_groups, fresh_groups):
                    group.update(fresh)
        if keep_step:
            for name in ("trainer_state", "lr_scheduler"):
                if name not in meta:
                    absent(f"{name} in meta.json", "init_keep_step")
            if "trainer_state" in meta:
                counters, own = dict(meta["trainer_state"]), self.trainer_state.state_dict()
                if not resume and "wandb_run_id" in own:  # another run's W&B id is not ours
                    counters["wandb_run_id"] = own["wandb_run_id"]
                self.trainer_state.load_state_dict(counters)
            if "lr_scheduler" in meta:
                self.lr_scheduler.load_state_dict(meta["lr_scheduler"])
                self._sync_lr_to_schedule()
        if "data" in parts:
            if "data_loader" in meta:
                try:  # the loader refuses a state it cannot continue (another seed, changed shards)
                    self.data_loader.load_state_dict(meta["data_loader"])
                except ValueError as err:
                    raise ValueError(f"{ckpt / META_FILE}: {err}") from None
            else:
                absent("data loader state in meta.json", "init_load")
        if load_rng:
            _set_rng_state(_strip(state, f"rng.rank{self.rank}."))
        if self.rank == 0 and meta.get("world_size", self.world_size) != self.world_size:
            logger.info("%s was saved by %s ranks, loaded on %d: model and optimizer resharded",
                        ckpt, meta["world_size"], self.world_size)

    def _sync_lr_to_schedule(self) -> None:
        """Make the optimizer's lr the loaded schedule's. fms_bamba.optim.LRScheduler does so in
        its load_state_dict; torch's schedulers do not (they expect the optimizer's own state)."""
        if isinstance(self.lr_scheduler, torch.optim.lr_scheduler.LRScheduler):
            for group, lr in zip(self.optimizer.param_groups, self.lr_scheduler.get_last_lr()):
                group["lr"] = lr
