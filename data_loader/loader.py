"""The training loader: mixed, packed batches for one rank, and the job-wide state behind them.

Rank `r` of `R`, micro-batch size `B`: its step `s` (counted from the point the loader started or
resumed, `start`) holds global samples `start + (s·R + r)·B + i`, i < B. Dataloader worker `w` of
`W` produces the steps s ≡ w (mod W), and StatefulDataLoader takes from its workers in
round-robin order, so batches arrive in step order. The only thing that advances is the global
count of samples consumed, which is why a state means the same on any number of ranks × workers.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from data_loader.config import DataConfig
from data_loader.mixing import MixPlan, SampleMapper
from data_loader.shards import index_dataset
from data_loader.stream import DatasetStream

STATE_FORMAT = "fms-bamba-data/1"
IGNORE_INDEX = -100
BATCH_KEYS = ("input_ids", "labels", "doc_ids")


def build_streams(cfg: DataConfig, vocab_size: Optional[int] = None) -> list[DatasetStream]:
    """One stream per configured dataset (reads counts files or shard indexes, not tokens)."""
    for name in ("bos_token_id", "eos_token_id"):
        token = getattr(cfg, name)
        if vocab_size is not None and token is not None and token >= vocab_size:
            raise ValueError(f"data.{name}: {token} is outside the model's vocabulary [0, {vocab_size})")
    return [
        DatasetStream(
            index_dataset(name, path, cfg.token_column),
            seed=cfg.seed,
            token_column=cfg.token_column,
            bos_token_id=cfg.bos_token_id,
            eos_token_id=cfg.eos_token_id,
            vocab_size=vocab_size,
        )
        for name, path in zip(cfg.datasets, cfg.dataset_paths())
    ]


def pack_batch(streams: list[DatasetStream], mapper: SampleMapper, first_sample: int, batch_size: int) -> torch.Tensor:
    """Global samples [first_sample, first_sample + batch_size) as input_ids, labels, doc_ids: [3, B, S].

    One tensor rather than three: every tensor a dataloader worker hands over costs a fresh
    shared-memory segment and a file-descriptor round trip.
    """
    sample_tokens = mapper.plan.sample_tokens
    windows = np.empty((batch_size, sample_tokens), np.int64)
    documents = np.empty((batch_size, sample_tokens), np.int64)
    for row in range(batch_size):
        dataset, position = mapper.locate(first_sample + row)
        piece_lengths = streams[dataset].read(position, windows[row])
        documents[row] = np.repeat(np.arange(len(piece_lengths)), piece_lengths)
    vocab_size = streams[0].vocab_size
    if vocab_size is not None and (windows.min() < 0 or windows.max() >= vocab_size):
        for row in range(batch_size):
            dataset, position = mapper.locate(first_sample + row)
            streams[dataset].check_vocabulary(position, sample_tokens)
    batch = np.empty((3, batch_size, sample_tokens - 1), np.int64)
    input_ids, labels, doc_ids = batch
    input_ids[:] = windows[:, :-1]
    labels[:] = windows[:, 1:]
    # A document's last token has nothing of its own to predict.
    labels[documents[:, 1:] != documents[:, :-1]] = IGNORE_INDEX
    doc_ids[:] = documents[:, :-1]
    return torch.from_numpy(batch)


class PackedSamples(IterableDataset):
    """Endless batches of one rank from `start_sample` on; each worker makes every W-th step."""

    def __init__(self, streams: list[DatasetStream], *, rank: int, world_size: int, micro_batch_size: int):
        self.streams = streams
        self.rank = rank
        self.world_size = world_size
        self.micro_batch_size = micro_batch_size
        self.mapper: Optional[SampleMapper] = None
        self.start_sample = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        step = worker
        while True:
            first = self.start_sample + (step * self.world_size + self.rank) * self.micro_batch_size
            yield pack_batch(self.streams, self.mapper, first, self.micro_batch_size)
            step += workers


class TokenDataLoader:
    """Iterable of batch dicts over a StatefulDataLoader, with a job-wide, layout-free state.

    Every rank is expected to take the same number of batches (as data-parallel training does);
    the state then counts what the whole job consumed. Iterating again (e.g. after
    `load_state_dict`) continues from the current position.
    """

    def __init__(self, cfg: DataConfig, streams: list[DatasetStream], *, rank: int, world_size: int, seq_len: int, micro_batch_size: int):
        self.cfg = cfg
        self.streams = streams
        self.world_size = world_size
        self.micro_batch_size = micro_batch_size
        self.plan = MixPlan(
            seed=cfg.seed,
            sample_tokens=seq_len + 1,
            shuffle_buffer=cfg.shuffle_buffer,
            base_sample=0,
            names=list(cfg.datasets),
            weights=cfg.normalized_weights(),
            tokens_at_base=[0] * len(streams),
        )
        self.samples_seen = 0
        self._samples = PackedSamples(streams, rank=rank, world_size=world_size, micro_batch_size=micro_batch_size)
        self._samples.mapper = SampleMapper(self.plan)
        with warnings.catch_warnings():  # torchdata 0.11 warns about its own use of torch.set_vital
            warnings.filterwarnings("ignore", message=".*set_vital.*")
            self._loader = StatefulDataLoader(
                self._samples,
                batch_size=None,
                num_workers=cfg.num_workers,
                pin_memory=cfg.pin_memory and torch.cuda.is_available(),
                # The loader's state is its own sample count: skip torchdata's per-step worker snapshots.
                snapshot_every_n_steps=None,
            )

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self._samples.start_sample = self.samples_seen
        for packed in self._loader:
            self.samples_seen += self.world_size * self.micro_batch_size
            yield dict(zip(BATCH_KEYS, packed.unbind(0)))

    def reading_plan(self, samples_end: int) -> list[dict[str, Any]]:
        """Per dataset, what the job has read once `samples_end` global samples are consumed:
        name, weight, tokens on disk (one epoch), tokens read and the epochs they make."""
        consumed = self._samples.mapper.tokens_consumed(samples_end)
        return [{"name": name, "weight": weight, "epoch_tokens": stream.epoch_tokens, "tokens": tokens,
                 "epochs": tokens / stream.epoch_tokens}
                for name, weight, stream, tokens in zip(self.plan.names, self.plan.weights, self.streams, consumed)]

    def state_dict(self) -> dict[str, Any]:
        """Job-wide progress: identical on every rank that took the same number of steps."""
        mapper = self._samples.mapper
        consumed = mapper.tokens_consumed(self.samples_seen)
        state = {
            "format": STATE_FORMAT,
            "seed": self.plan.seed,
            "sample_tokens": self.plan.sample_tokens,
            "shuffle_buffer": self.plan.shuffle_buffer,
            "base_sample": self.plan.base_sample,
            "samples_seen": self.samples_seen,
            "datasets": [
                {
                    "name": name,
                    "weight": weight,
                    "tokens_at_base": base,
                    "epoch_tokens": stream.epoch_tokens,
                    "epoch_documents": int(stream.index.documents.sum()),
                    "tokens_consumed": tokens,
                    "documents_finished": stream.documents_finished(tokens),
                }
                for name, weight, base, stream, tokens in zip(
                    self.plan.names, self.plan.weights, self.plan.tokens_at_base, self.streams, consumed
                )
            ],
        }
        if self.cfg.num_workers > 0:
            # Workers do the reading: keep no shard mapped in the training process.
            for stream in self.streams:
                stream.close_shards()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state` left off, on this loader's ranks × workers, weights and datasets.

        Same datasets, weights, seq_len and shuffle_buffer: exactly the batches the uninterrupted run
        would have produced. Otherwise the plan re-bases at the state's sample count: each dataset
        continues its stream where it stopped (a new dataset starts at its beginning; with a shuffle
        buffer, the unfinished block is skipped).
        """
        old_plan, samples_seen, epoch_tokens = parse_state(state)
        if old_plan.seed != self.cfg.seed:
            raise ValueError(
                f"data loader state: seed {old_plan.seed} differs from data.seed {self.cfg.seed}; "
                "the shuffles would not line up, so documents would repeat"
            )
        check_streams_unchanged(self.streams, epoch_tokens)
        unchanged = (old_plan.names, old_plan.weights, old_plan.sample_tokens, old_plan.shuffle_buffer) == (
            self.plan.names,
            self.plan.weights,
            self.plan.sample_tokens,
            self.plan.shuffle_buffer,
        )
        if unchanged:
            self.plan = old_plan
        else:
            consumed = dict(zip(old_plan.names, SampleMapper(old_plan).tokens_consumed(samples_seen, whole_blocks=True)))
            self.plan = replace(self.plan, base_sample=samples_seen, tokens_at_base=[consumed.get(name, 0) for name in self.plan.names])
        self.samples_seen = samples_seen
        self._samples.mapper = SampleMapper(self.plan)


def state_field(container: dict, key: str, kind: type, where: str = "") -> Any:
    """`container[key]` if it is a `kind` (non-negative for int and float); ValueError naming the field otherwise."""
    if key not in container:
        raise ValueError(f"data loader state: missing field '{where}{key}' (not a state written by data_loader)")
    value = container[key]
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    else:
        ok = isinstance(value, kind) and not isinstance(value, bool) and (kind is not int or value >= 0)
    if not ok:
        raise ValueError(f"data loader state: field '{where}{key}' = {value!r} is not a valid {kind.__name__}")
    return value


def parse_state(state: Any) -> tuple[MixPlan, int, dict[str, int]]:
    """(plan, samples seen, tokens per epoch by dataset) from a loader state; ValueError if malformed."""
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"data loader state: format {found!r} is not {STATE_FORMAT!r} (a state from another loader)")
    datasets = state_field(state, "datasets", list)
    if not datasets or not all(isinstance(entry, dict) for entry in datasets):
        raise ValueError("data loader state: field 'datasets' must be a non-empty list of objects")
    where = [f"datasets[{i}]." for i in range(len(datasets))]
    plan = MixPlan(
        seed=state_field(state, "seed", int),
        sample_tokens=state_field(state, "sample_tokens", int),
        shuffle_buffer=state_field(state, "shuffle_buffer", int),
        base_sample=state_field(state, "base_sample", int),
        names=[state_field(entry, "name", str, at) for entry, at in zip(datasets, where)],
        weights=[float(state_field(entry, "weight", float, at)) for entry, at in zip(datasets, where)],
        tokens_at_base=[state_field(entry, "tokens_at_base", int, at) for entry, at in zip(datasets, where)],
    )
    samples_seen = state_field(state, "samples_seen", int)
    if plan.sample_tokens < 2 or samples_seen < plan.base_sample:
        raise ValueError(
            f"data loader state: inconsistent fields (sample_tokens {plan.sample_tokens}, "
            f"base_sample {plan.base_sample}, samples_seen {samples_seen})"
        )
    epoch_tokens = {entry["name"]: state_field(entry, "epoch_tokens", int, at) for entry, at in zip(datasets, where)}
    if len(epoch_tokens) != len(datasets) or 0 in epoch_tokens.values():
        raise ValueError("data loader state: dataset names must be distinct and epoch_tokens positive")
    return plan, samples_seen, epoch_tokens


def check_streams_unchanged(streams: list[DatasetStream], epoch_tokens: dict[str, int]) -> None:
    """A dataset that a state already read from must still be the same stream."""
    for stream in streams:
        name = stream.index.name
        if name in epoch_tokens and epoch_tokens[name] != stream.epoch_tokens:
            raise ValueError(
                f"data loader state: dataset {name!r} had {epoch_tokens[name]} tokens per epoch, now "
                f"{stream.epoch_tokens}; its shards or data.bos_token_id / data.eos_token_id changed"
            )


def build_dataloader(
    cfg: DataConfig,
    *,
    rank: int,
    world_size: int,
    seq_len: int,
    micro_batch_size: int,
    vocab_size: Optional[int] = None,
) -> TokenDataLoader:
    """Batches `{"input_ids", "labels", "doc_ids"}` (int64 [micro_batch_size, seq_len]) for `rank`.

    Endless (epochs reshuffle); `vocab_size`, when given, makes every token id be checked against it.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"build_dataloader: rank {rank} is outside world_size {world_size}")
    if seq_len < 1 or micro_batch_size < 1:
        raise ValueError(f"build_dataloader: seq_len ({seq_len}) and micro_batch_size ({micro_batch_size}) must be >= 1")
    cfg.validate()
    streams = build_streams(cfg, vocab_size)
    return TokenDataLoader(cfg, streams, rank=rank, world_size=world_size, seq_len=seq_len, micro_batch_size=micro_batch_size)
