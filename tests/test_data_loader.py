"""The data loader: packing, mixing, exact resume, rescaling, accounting, bad input.

Every stored token encodes its document and position: `uid * 100 + position`, uids unique
over the corpus (uid 0 is reserved for BOS = 0 and EOS = 1). With BOS on, a window's last token
is hidden only when it is a BOS (its label is masked), so every window can be rebuilt from a
batch, and the tests check the batches themselves rather than the loader's own bookkeeping.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from data_loader import DataConfig, build_dataloader, consumed_documents, describe_progress
from data_loader.shards import write_counts_file

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")

BOS, EOS = 0, 1
UIDS_PER_DATASET = 100_000


class Corpus:
    """Datasets written to disk, and each document's uid and length by (dataset, file, index)."""

    def __init__(self, root: Path):
        self.root = root
        self.lengths: dict[int, int] = {}
        self.uid_of: dict[tuple[str, str, int], int] = {}
        self.dataset_of_uid: dict[int, str] = {}

    def add(self, name: str, documents: int, files: int, *, kind: str = "arrow", dtype=np.uint32, counts: bool = True, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        number = len({d for d in self.dataset_of_uid.values()})
        uids = np.arange(documents) + number * UIDS_PER_DATASET + 1
        directory = self.root / name
        directory.mkdir(parents=True)
        shard_counts = {}
        for file_number, file_uids in enumerate(np.array_split(uids, files)):
            file = f"part-{file_number:03d}.{kind}"
            docs = []
            for index, uid in enumerate(file_uids):
                length = int(rng.integers(1, 40))
                docs.append(np.arange(length, dtype=np.int64) + int(uid) * 100)
                self.lengths[int(uid)] = length
                self.uid_of[(name, file, index)] = int(uid)
                self.dataset_of_uid[int(uid)] = name
            write_shard(directory / file, docs, dtype)
            shard_counts[file] = (len(docs), sum(len(d) for d in docs))
        if counts:
            write_counts_file(directory, shard_counts)


def write_shard(path: Path, docs: list[np.ndarray], dtype=np.uint32, column: str = "tokens") -> None:
    if path.suffix == ".parquet":
        pq.write_table(pa.table({column: pa.array([d.astype(dtype) for d in docs], pa.list_(pa.from_numpy_dtype(dtype)))}), path, row_group_size=64)
        return
    schema = pa.schema([(column, pa.from_numpy_dtype(dtype))])
    with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, schema) as writer:
        for doc in docs:
            writer.write_batch(pa.record_batch([pa.array(doc.astype(dtype))], schema=schema))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    corpus = Corpus(tmp_path_factory.mktemp("corpus"))
    corpus.add("a", 3000, 7, seed=1)
    corpus.add("b", 2000, 5, dtype=np.int32, counts=False, seed=2)
    corpus.add("c", 1000, 4, kind="parquet", seed=3)
    return corpus


def config(corpus: Corpus, **overrides) -> DataConfig:
    fields = dict(root=str(corpus.root), datasets=["a", "b", "c"], weights=[3.0, 2.0, 1.0], seed=7, num_workers=0, bos_token_id=BOS, eos_token_id=EOS)
    fields.update(overrides)
    return DataConfig(**fields)


def check_batch_contract(batch: dict, batch_size: int, seq_len: int) -> None:
    for key in ("input_ids", "labels", "doc_ids"):
        assert batch[key].shape == (batch_size, seq_len) and batch[key].dtype.is_floating_point is False
    ids, labels, docs = batch["input_ids"].numpy(), batch["labels"].numpy(), batch["doc_ids"].numpy()
    assert (docs[:, 0] == 0).all() and set(np.unique(np.diff(docs, axis=1))) <= {0, 1}
    # A new document starts exactly at each BOS (except possibly at position 0).
    assert ((np.diff(docs, axis=1) == 1) == (ids[:, 1:] == BOS)).all()
    masked = labels == -100
    assert ((labels[:, :-1] == ids[:, 1:]) | masked[:, :-1]).all()
    assert (masked[:, :-1] == (np.diff(docs, axis=1) == 1)).all()
    assert (ids[masked] == EOS).all()  # only a document's end is left without a target


def windows_of(batch: dict) -> list[np.ndarray]:
    """The seq_len + 1 tokens of every row (a masked last label can only be a BOS)."""
    last = batch["labels"][:, -1:].numpy().copy()
    last[last == -100] = BOS
    return list(np.concatenate([batch["input_ids"].numpy(), last], axis=1))


def dataset_of_window(corpus: Corpus, window: np.ndarray) -> str:
    uid = int(window[window >= 100][0]) // 100
    return corpus.dataset_of_uid[uid]


def run_phases(corpus: Corpus, phases: list[dict], state=None) -> tuple[dict[int, np.ndarray], dict]:
    """Run (cfg, ranks, workers, steps, seq_len, batch) phases, each resuming the previous state.

    Returns the windows by global sample index and the final state.
    """
    windows: dict[int, np.ndarray] = {}
    for phase in phases:
        cfg, ranks, steps, seq_len, batch = phase["cfg"], phase["ranks"], phase["steps"], phase["seq_len"], phase["batch"]
        start = state["samples_seen"] if state else 0
        states = []
        for rank in range(ranks):
            loader = build_dataloader(cfg, rank=rank, world_size=ranks, seq_len=seq_len, micro_batch_size=batch, vocab_size=10**9)
            if state is not None:
                loader.load_state_dict(json.loads(json.dumps(state)))
            iterator = iter(loader)
            for step in range(steps):
                batch_dict = next(iterator)
                check_batch_contract(batch_dict, batch, seq_len)
                for row, window in enumerate(windows_of(batch_dict)):
                    windows[start + (step * ranks + rank) * batch + row] = window
            states.append(loader.state_dict())
        assert all(s == states[0] for s in states), "loader state differs between ranks"
        assert states[0]["samples_seen"] == start + steps * ranks * batch
        state = states[0]
    assert sorted(windows) == list(range(len(windows)))
    return windows, state


def split_documents(corpus: Corpus, stream: np.ndarray) -> list[int]:
    """Uids of the documents of a rebuilt stream, checking each is BOS, all its tokens in order, EOS."""
    starts = np.flatnonzero(stream == BOS)
    assert starts[0] == 0, "a dataset stream must start with a document"
    uids = []
    for start, stop in zip(starts, list(starts[1:]) + [len(stream)]):
        doc = stream[start:stop]
        if len(doc) == 1:  # the stream ends on this document's BOS
            break
        uid = int(doc[1]) // 100
        expected = np.concatenate([[BOS], uid * 100 + np.arange(corpus.lengths[uid]), [EOS]])
        if stop == len(stream):  # the stream may end inside its last document
            expected = expected[: len(doc)]
        np.testing.assert_array_equal(doc, expected)
        uids.append(uid)
    return uids


def dataset_streams(corpus: Corpus, windows: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
    pieces: dict[str, list[np.ndarray]] = {}
    for g in sorted(windows):
        pieces.setdefault(dataset_of_window(corpus, windows[g]), []).append(windows[g])
    return {name: np.concatenate(parts) for name, parts in pieces.items()}


def check_epoch_coverage(corpus: Corpus, windows: dict[int, np.ndarray]) -> None:
    """Per dataset: the first epoch holds every document once, whole and in order; epoch 2 reshuffles."""
    shard_orders_changed = []
    for name, stream in dataset_streams(corpus, windows).items():
        uids = split_documents(corpus, stream)
        documents = [uid for uid, dataset in corpus.dataset_of_uid.items() if dataset == name]
        assert len(uids) > len(documents), f"dataset {name} did not finish its first epoch"
        assert sorted(uids[: len(documents)]) == sorted(documents)
        assert uids[len(documents) : 2 * len(documents)] != uids[: len(uids) - len(documents)], "epoch 2 not reshuffled"
        file_of = {uid: file for (dataset, file, _), uid in corpus.uid_of.items() if dataset == name}
        files = lambda epoch_uids: [f for i, f in enumerate(map(file_of.get, epoch_uids)) if i == 0 or f != file_of[epoch_uids[i - 1]]]  # noqa: E731
        second_epoch = uids[len(documents) :]
        shard_orders_changed.append(files(second_epoch) != files(uids[: len(second_epoch)]))
    assert any(shard_orders_changed), "epoch 2 kept the shard order"


def test_rescale_changes_of_ranks_and_workers_cover_every_document_once(corpus):
    cfg = config(corpus)
    # ranks x workers: 4 -> 3 -> 2 -> 5 -> 1 -> 6, over more than one epoch of every dataset.
    layouts = [(2, 2, 35), (3, 1, 30), (1, 2, 70), (5, 1, 20), (1, 1, 45), (2, 3, 110)]
    phases = [dict(cfg=replace(cfg, num_workers=w), ranks=r, steps=s, seq_len=64, batch=4) for r, w, s in layouts]
    windows, state = run_phases(corpus, phases)
    check_epoch_coverage(corpus, windows)

    # The accounting API agrees with what the batches held, token for token.
    from_batches = Counter()
    for window in windows.values():
        stored = window[window >= 100]
        from_batches.update((stored // 100).tolist())
    accounted = Counter()
    for ref, tokens in consumed_documents(cfg, state).items():
        accounted[corpus.uid_of[(ref.dataset, ref.file, ref.document)]] += tokens
    assert accounted == from_batches
    progress = describe_progress(state)
    assert set(progress) == {"a", "b", "c"} and all(p["epoch"] == 1 for p in progress.values())
    assert sum(p["tokens"] for p in progress.values()) == state["samples_seen"] * 65


def test_resume_is_exact_mid_epoch_with_two_workers(corpus):
    cfg = config(corpus, num_workers=2, shuffle_buffer=16)
    loader = build_dataloader(cfg, rank=1, world_size=2, seq_len=48, micro_batch_size=3)
    iterator = iter(loader)
    uninterrupted = [next(iterator) for _ in range(25)]
    final_state = loader.state_dict()

    first = build_dataloader(cfg, rank=1, world_size=2, seq_len=48, micro_batch_size=3)
    iterator = iter(first)
    for _ in range(9):
        next(iterator)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = build_dataloader(cfg, rank=1, world_size=2, seq_len=48, micro_batch_size=3)
    resumed.load_state_dict(state)
    iterator = iter(resumed)
    for expected in uninterrupted[9:]:
        got = next(iterator)
        for key in expected:
            assert torch_equal(got[key], expected[key])
    assert resumed.state_dict() == final_state


def torch_equal(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())


def test_shuffle_buffer_permutes_within_blocks_across_rescale(corpus):
    block = 8
    reference, _ = run_phases(corpus, [dict(cfg=config(corpus), ranks=1, steps=150, seq_len=32, batch=4)])
    cfg = config(corpus, shuffle_buffer=block)
    shuffled, state = run_phases(
        corpus,
        [
            dict(cfg=replace(cfg, num_workers=2), ranks=2, steps=21, seq_len=32, batch=4),
            dict(cfg=cfg, ranks=3, steps=15, seq_len=32, batch=4),
        ],
    )
    by_dataset = lambda windows: {  # noqa: E731
        name: [tuple(w) for g, w in sorted(windows.items()) if dataset_of_window(corpus, w) == name] for name in ("a", "b", "c")
    }
    reference_windows, shuffled_windows = by_dataset(reference), by_dataset(shuffled)
    for name in ("a", "b", "c"):
        got, taken = shuffled_windows[name], len(shuffled_windows[name])
        whole = taken // block * block
        assert len(set(got)) == taken, "a window was delivered twice"
        assert set(reference_windows[name][:whole]) <= set(got)
        assert set(got) <= set(reference_windows[name][: whole + block])
        assert got != reference_windows[name][:taken]


def test_re_base_with_a_shuffle_buffer_repeats_no_window(corpus):
    cfg = config(corpus, shuffle_buffer=8)
    windows, state = run_phases(
        corpus,
        [
            dict(cfg=cfg, ranks=1, steps=13, seq_len=32, batch=5),
            dict(cfg=replace(cfg, weights=[1.0, 1.0, 1.0]), ranks=2, steps=40, seq_len=32, batch=4),
        ],
    )
    assert state["base_sample"] == 65
    for name in "abc":
        mine = [tuple(w) for w in windows.values() if dataset_of_window(corpus, w) == name]
        assert len(mine) == len(set(mine)), f"dataset {name} delivered a window twice across the re-base"


def test_token_shares_track_weights_over_a_million_tokens(corpus):
    cfg = config(corpus, weights=[5.0, 3.0, 2.0], bos_token_id=None, eos_token_id=None)
    loader = build_dataloader(cfg, rank=0, world_size=1, seq_len=255, micro_batch_size=16)
    tokens = Counter()
    for batch in loader:
        for window in windows_of(batch):
            tokens[dataset_of_window(corpus, window)] += len(window)
        if sum(tokens.values()) >= 1_000_000:
            break
    total = sum(tokens.values())
    for name, weight in zip("abc", (0.5, 0.3, 0.2)):
        assert abs(tokens[name] / total - weight) < 0.01 * weight


def test_reading_plan_is_what_the_loader_then_reads(corpus):
    """The plan for N samples, made before any batch, equals the state after N samples, dataset by
    dataset, and counts the windows each dataset really supplied."""
    cfg = config(corpus, weights=[5.0, 3.0, 2.0], bos_token_id=None, eos_token_id=None, shuffle_buffer=0)
    loader = build_dataloader(cfg, rank=0, world_size=1, seq_len=63, micro_batch_size=8)
    plan = loader.reading_plan(8 * 25)
    windows = Counter()
    for step, batch in enumerate(loader, start=1):
        windows.update(dataset_of_window(corpus, window) for window in windows_of(batch))
        if step == 25:
            break
    state = loader.state_dict()["datasets"]
    assert [source["name"] for source in plan] == ["a", "b", "c"]
    for source, read in zip(plan, state):
        assert source["tokens"] == read["tokens_consumed"] == windows[source["name"]] * 64
        assert source["epoch_tokens"] == read["epoch_tokens"]
        assert source["epochs"] == pytest.approx(read["tokens_consumed"] / read["epoch_tokens"])
    assert [windows[name] for name in "abc"] == [100, 60, 40]


def test_changed_weights_added_dataset_and_seq_len_continue_each_stream(corpus):
    two = config(corpus, datasets=["a", "b"], weights=[1.0, 1.0])
    three = config(corpus, weights=[1.0, 1.0, 2.0], num_workers=2)
    phases = [
        dict(cfg=two, ranks=2, steps=40, seq_len=64, batch=4),
        dict(cfg=three, ranks=3, steps=30, seq_len=64, batch=4),
        dict(cfg=replace(three, weights=[4.0, 1.0, 1.0]), ranks=1, steps=150, seq_len=80, batch=4),
    ]
    windows, state = run_phases(corpus, phases)
    assert state["base_sample"] == 40 * 2 * 4 + 30 * 3 * 4
    phase_starts = [0, 40 * 2 * 4, 40 * 2 * 4 + 30 * 3 * 4, len(windows)]
    for phase, weights in enumerate([(0.5, 0.5, 0.0), (0.25, 0.25, 0.5), (4 / 6, 1 / 6, 1 / 6)]):
        names = Counter(dataset_of_window(corpus, windows[g]) for g in range(phase_starts[phase], phase_starts[phase + 1]))
        samples = phase_starts[phase + 1] - phase_starts[phase]
        for name, weight in zip("abc", weights):
            assert abs(names[name] - weight * samples) <= 2, f"phase {phase}: {names} against weights {weights}"
    # Each dataset's windows, in global order, are exactly the start of its uninterrupted stream:
    # whole documents, in the stream's order, none repeated, none skipped.
    for name, stream in dataset_streams(corpus, windows).items():
        uids = split_documents(corpus, stream)
        assert uids == stream_order(corpus, name, len(stream))[: len(uids)]
        assert len(uids) == len(set(uids)), f"dataset {name} repeated a document"


def stream_order(corpus: Corpus, name: str, tokens: int) -> list[int]:
    """Document uids of the first `tokens` tokens of a dataset's stream, read on its own."""
    loader = build_dataloader(config(corpus, datasets=[name], weights=[]), rank=0, world_size=1, seq_len=511, micro_batch_size=8)
    windows: list[np.ndarray] = []
    for batch in loader:
        windows += windows_of(batch)
        if len(windows) * 512 > tokens:
            return split_documents(corpus, np.concatenate(windows))


def test_prepared_shards_without_bos_eos_settings_pack_as_stored(corpus):
    cfg = config(corpus, datasets=["c"], weights=[], bos_token_id=None, eos_token_id=None)
    loader = build_dataloader(cfg, rank=0, world_size=1, seq_len=100, micro_batch_size=2)
    batch = next(iter(loader))
    ids, docs = batch["input_ids"].numpy(), batch["doc_ids"].numpy()
    # Without separators, a document boundary is where the position within a document restarts.
    restarts = np.diff(ids % 100, axis=1) != 1
    assert (restarts == (np.diff(docs, axis=1) == 1)).all()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(datasets=["a", "missing"]), "missing"),
        (dict(weights=[1.0, 2.0]), "data.weights: 2 weights for 3 datasets"),
        (dict(weights=[1.0, -2.0, 1.0]), "weight of 'b' is negative"),
        (dict(weights=[0.0, 0.0, 0.0]), "at least one weight must be positive"),
        (dict(token_column="ids"), "no token column 'ids'"),
        (dict(datasets=[]), "data.datasets"),
        (dict(root="/nonexistent-root"), "data.root"),
        (dict(num_workers=-1), "data.num_workers"),
    ],
)
def test_bad_config_is_rejected_naming_the_field(corpus, overrides, message):
    with pytest.raises(ValueError, match=message):
        config(corpus, **overrides).validate()


def test_bad_shards_are_rejected_naming_the_file(corpus, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no .arrow or .parquet shards"):
        DataConfig(datasets=[str(empty)]).validate()

    good = (corpus.root / "a" / "part-000.arrow").read_bytes()
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "part.arrow").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"truncated/part\.arrow: corrupt or truncated"):
        build_dataloader(DataConfig(datasets=[str(truncated)]), rank=0, world_size=1, seq_len=8, micro_batch_size=1)

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "part.arrow").write_bytes(b"ARROW1\x00\x00" + bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=r"corrupt/part\.arrow: corrupt or truncated"):
        DataConfig(datasets=[str(corrupt)]).validate()

    # A shard that breaks after start-up (counts file present) fails in the worker, naming the file.
    late = tmp_path / "late"
    late.mkdir()
    write_shard(late / "part-0.arrow", [np.arange(50)] * 4)
    write_shard(late / "part-1.arrow", [np.arange(50)] * 4)
    write_counts_file(late, {"part-0.arrow": (4, 200), "part-1.arrow": (4, 200)})
    loader = build_dataloader(DataConfig(datasets=[str(late)], num_workers=1), rank=0, world_size=1, seq_len=399, micro_batch_size=1)
    (late / "part-1.arrow").write_bytes(good)
    with pytest.raises(ValueError, match=r"part-1\.arrow: holds .* counts\.csv recorded 4 / 200"):
        next(iter(loader))

    stale = tmp_path / "stale"
    stale.mkdir()
    write_shard(stale / "part-0.arrow", [np.arange(5)])
    write_counts_file(stale, {"other.arrow": (1, 5)})
    with pytest.raises(ValueError, match=r"stale/counts\.csv: does not match"):
        DataConfig(datasets=[str(stale)]).validate()


def test_token_ids_outside_the_vocabulary_are_rejected(corpus):
    loader = build_dataloader(config(corpus, num_workers=1), rank=0, world_size=1, seq_len=64, micro_batch_size=2, vocab_size=1000)
    with pytest.raises(ValueError, match=r"part-\d+\.(arrow|parquet): document \d+ holds token id \d+, outside"):
        next(iter(loader))
    with pytest.raises(ValueError, match="data.bos_token_id"):
        build_dataloader(config(corpus, bos_token_id=5000), rank=0, world_size=1, seq_len=8, micro_batch_size=1, vocab_size=1000)


def test_incompatible_states_are_rejected(corpus, tmp_path):
    cfg = config(corpus)
    loader = build_dataloader(cfg, rank=0, world_size=1, seq_len=16, micro_batch_size=2)
    next(iter(loader))
    state = loader.state_dict()
    fresh = lambda c=cfg: build_dataloader(c, rank=0, world_size=1, seq_len=16, micro_batch_size=2)  # noqa: E731
    with pytest.raises(ValueError, match="format"):
        fresh().load_state_dict({"_snapshot": {}, "_steps_since_snapshot": 0})
    broken = json.loads(json.dumps(state))
    del broken["datasets"][1]["tokens_at_base"]
    with pytest.raises(ValueError, match=r"missing field 'datasets\[1\]\.tokens_at_base'"):
        fresh().load_state_dict(broken)
    broken = json.loads(json.dumps(state))
    broken["samples_seen"] = -3
    with pytest.raises(ValueError, match="'samples_seen' = -3"):
        fresh().load_state_dict(broken)
    with pytest.raises(ValueError, match="seed 7 differs from data.seed 8"):
        fresh(replace(cfg, seed=8)).load_state_dict(state)
    with pytest.raises(ValueError, match="dataset 'a' had .* tokens per epoch"):
        fresh(replace(cfg, bos_token_id=None)).load_state_dict(state)
    with pytest.raises(ValueError, match="format"):
        describe_progress({"samples_seen": 3})
