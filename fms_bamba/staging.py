"""Host memory for async checkpoints: the copy of the training state that a save writes, held in
buffers allocated once per run (at the start of training, or else at the first save) and reused by
every save.

Why our own stager rather than DCP's DefaultStager: on torch 2.11 that one frees its buffers after
every copy, so each save pinned the whole state again (58.7 GB per rank at Bamba-9B on 2 GPUs), and
reusing it failed outright (docs/checkpoints.md). Registering pages with CUDA is slow and competes
with training; doing it once per run makes every later save a plain device-to-host copy.
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.tensor import DTensor


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor; a plain tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


PIN_MIN_BYTES = 1 << 20
"""Smaller tensors stay pageable: pinning buys them nothing, and two of them may share a page,
which CUDA refuses to register twice."""


def _host_buffer(shape: torch.Size, dtype: torch.dtype, *, pin: bool, shared: bool) -> torch.Tensor:
    """An uninitialised CPU tensor, in shared memory and/or page-locked."""
    buffer = torch.empty(shape, dtype=dtype)
    if shared:
        buffer.share_memory_()
    if pin and buffer.nbytes >= PIN_MIN_BYTES:
        cudart = torch.cuda.cudart()
        error = int(cudart.cudaHostRegister(buffer.data_ptr(), buffer.nbytes, 0))
        if error:
            raise RuntimeError(f"cudaHostRegister of {buffer.nbytes} bytes of checkpoint staging memory "
                               f"failed (cudaError {error})")
        # Unregistered when the buffer is freed; not at exit, when the CUDA context may be gone.
        weakref.finalize(buffer, cudart.cudaHostUnregister, buffer.data_ptr()).atexit = False
    return buffer


class HostStager(AsyncStager):
    """DCP's AsyncStager for a flat state dict (key -> tensor, DTensor or plain value).

    `stage` returns at once with a Future; a thread of the stager's copies every tensor (a
    DTensor's local shard) into its host buffer on a CUDA stream of its own, beside training. The
    caller must keep the source tensors unchanged until the Future is done (the trainer's
    optimizer step waits for it). A buffer is reallocated only when its key's shape or dtype
    changes (the few bytes of the Python RNG state). `reserve` allocates the buffers ahead of the
    first save, on the same thread, so a save queued behind it finds them made."""

    _synchronize_after_execute = False  # the trainer waits on the Future before the next update

    def __init__(self, *, shared: bool):
        """shared: buffers in shared memory, for DCP's checkpoint process. With CUDA they are pinned."""
        self.pin, self.shared = torch.cuda.is_available(), shared
        self.buffers: dict[str, torch.Tensor] = {}
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-staging")
        # Made here, on the thread that trains, so it is a stream of the training device.
        self.stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        self.future: Future | None = None

    def stage(self, state_dict: dict[str, Any]) -> Future:
        self.future = self.executor.submit(self._copy, dict(state_dict))
        return self.future

    def reserve(self, state_dict: dict[str, Any]) -> Future:
        """Allocate (and pin) the buffers `stage(state_dict)` will fill, on the stager's thread;
        returns at once. Registering pages with CUDA is what made a run's first save cost several
        times a later one (docs/performance.md); done at the start of a run it overlaps the first
        step's compilation instead of the steps beside a save."""
        shapes = {key: (local_shard(value).shape, value.dtype) for key, value in state_dict.items()
                  if isinstance(value, torch.Tensor)}
        return self.executor.submit(lambda: [self._buffer(key, *like) for key, like in shapes.items()])

    def synchronize_staging(self) -> None:
        if self.future is not None:
            self.future.result()

    def close(self) -> None:
        """Wait for a copy in flight, then free (and unregister) the buffers."""
        self.executor.shutdown(wait=True)
        self.buffers.clear()

    @torch.no_grad()
    def _copy(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        staged: dict[str, Any] = {}
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            for key, value in state_dict.items():
                if not isinstance(value, torch.Tensor):
                    staged[key] = copy.deepcopy(value)
                    continue
                local = local_shard(value)
                buffer = self._buffer(key, local.shape, local.dtype)
                buffer.copy_(local, non_blocking=self.pin)
                # The same sharding over the same mesh, with the shard in host memory (as DCP's own
                # stager leaves it), so the save plan and the files are those of the device state.
                staged[key] = DTensor(buffer, value._spec, requires_grad=False) if isinstance(value, DTensor) else buffer
        if self.stream is not None:
            self.stream.synchronize()
        return staged

    def _buffer(self, key: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """The host buffer of `key`, (re)allocated unless it has this shape and dtype."""
        buffer = self.buffers.get(key)
        if buffer is None or buffer.shape != shape or buffer.dtype != dtype:
            buffer = self.buffers[key] = _host_buffer(shape, dtype, pin=self.pin, shared=self.shared)
        return buffer
