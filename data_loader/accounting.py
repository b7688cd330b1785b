"""What a loader state has consumed: per document (for tests and audits) and per dataset (for humans)."""

from __future__ import annotations

from collections import Counter
from typing import Any, NamedTuple, Optional

from data_loader.config import DataConfig
from data_loader.loader import build_streams, check_streams_unchanged, parse_state, state_field
from data_loader.mixing import SampleMapper


class DocumentRef(NamedTuple):
    """One document in one epoch of a dataset."""

    dataset: str
    """The dataset's entry in DataConfig.datasets."""
    epoch: int
    file: str
    """Shard path relative to the dataset directory."""
    document: int
    """Index of the document (record batch / row) in the shard."""


def consumed_documents(cfg: DataConfig, state: dict[str, Any], since: Optional[dict[str, Any]] = None) -> Counter:
    """Stored tokens consumed from each document by `state`, minus those consumed by `since`.

    Returns a Counter {DocumentRef: tokens}; BOS/EOS added by the loader are not counted, so a
    document consumed exactly once in an epoch has its stored length. Reads shard indexes, not
    tokens. A document never appears twice in one epoch iff no count exceeds its length.
    """
    consumed = _consumed(cfg, state)
    if since is not None:
        consumed.subtract(_consumed(cfg, since))
        consumed = Counter({ref: tokens for ref, tokens in consumed.items() if tokens})
    return consumed


def _consumed(cfg: DataConfig, state: dict[str, Any]) -> Counter:
    plan, samples_seen, epoch_tokens = parse_state(state)
    streams = {stream.index.name: stream for stream in build_streams(cfg)}
    missing = [name for name in plan.names if name not in streams]
    if missing:
        raise ValueError(f"consumed_documents: the state read datasets {missing} that data.datasets does not list")
    check_streams_unchanged(list(streams.values()), epoch_tokens)
    mapper = SampleMapper(plan)
    consumed: Counter = Counter()
    for dataset, (name, taken) in enumerate(zip(plan.names, mapper.dataset_samples(samples_seen))):
        stream = streams[name]
        block = max(plan.shuffle_buffer, 1)
        whole = int(taken) // block * block
        # Everything up to the last whole shuffle block is a prefix of the stream; the samples of
        # an unfinished block are scattered in it.
        spans = [(0, plan.tokens_at_base[dataset] + whole * plan.sample_tokens)]
        spans += [(mapper.position(dataset, index), plan.sample_tokens) for index in range(whole, int(taken))]
        for position, length in spans:
            for segment in stream.segments(position, length):
                tokens = stream.stored_tokens(segment)
                if tokens:
                    consumed[DocumentRef(name, segment.epoch, stream.index.files[segment.file], segment.document)] += tokens
    return consumed


def describe_progress(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per dataset: weight, tokens consumed, documents finished, current epoch and how far into it."""
    parse_state(state)
    progress = {}
    for i, entry in enumerate(state["datasets"]):
        where = f"datasets[{i}]."
        tokens = state_field(entry, "tokens_consumed", int, where)
        epoch, offset = divmod(tokens, entry["epoch_tokens"])
        progress[entry["name"]] = {
            "weight": entry["weight"],
            "tokens": tokens,
            "documents": state_field(entry, "documents_finished", int, where),
            "epoch": epoch,
            "epoch_fraction": offset / entry["epoch_tokens"],
        }
    return progress
