"""The tokenizer CLI: raw corpora -> shards + counts.csv, round-tripped with a BPE trained here."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data_loader import DataConfig, build_dataloader
from data_loader.prepare import main, prepare_corpus
from data_loader.shards import COUNTS_FILE, load_counts

WORDS = "the quick brown fox jumps over a lazy dog while ünïcödé tokens stream into shards".split()


def make_texts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60))) + rng.choice(["", ".\n", "!"]) for _ in range(count)]


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(make_texts(500, seed=0), trainer)
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def write_raw_corpus(raw: Path) -> dict[str, list[str]]:
    """Raw files in every supported format; returns the non-empty texts expected per shard."""
    texts = make_texts(400, seed=1)
    (raw / "web" / "2024").mkdir(parents=True)
    with gzip.open(raw / "web" / "2024" / "part-0.json.gz", "wt", encoding="utf-8") as handle:
        for text in texts[:150] + ["", "   "]:
            handle.write(json.dumps({"id": 0, "text": text}) + "\n")
    (raw / "web" / "part-1.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in texts[150:250]))
    pq.write_table(pa.table({"text": texts[250:399] + [None]}), raw / "books.parquet")
    (raw / "note.txt").write_text(texts[399], encoding="utf-8")
    return {
        "web/2024/part-0.arrow": texts[:150],
        "web/part-1.arrow": texts[150:250],
        "books.arrow": texts[250:399],
        "note.arrow": [texts[399]],
    }


def read_shard(path: Path) -> list[list[int]]:
    reader = ipc.open_file(pa.memory_map(str(path)))
    return [reader.get_batch(i).column("tokens").to_pylist() for i in range(reader.num_record_batches)]


def test_cli_round_trips_text_and_reruns_skip_finished_shards(tmp_path, tokenizer_file, capsys):
    raw, out = tmp_path / "raw", tmp_path / "out"
    expected = write_raw_corpus(raw)
    assert main([str(raw), "--output", str(out), "--tokenizer", str(tokenizer_file), "--workers", "2", "--add-bos"]) == 0
    summary = capsys.readouterr().out
    assert "wrote 4 shards (0 already done): 400 documents" in summary and "3 empty documents skipped" in summary

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    bos, eos = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
    counts = load_counts(out / COUNTS_FILE)
    assert set(counts) == set(expected)
    for shard, texts in expected.items():
        documents = read_shard(out / shard)
        assert pa.ipc.open_file(pa.memory_map(str(out / shard))).schema.field("tokens").type == pa.uint32()
        assert counts[shard] == (len(documents), sum(map(len, documents)))
        assert all(doc[0] == bos and doc[-1] == eos for doc in documents)
        assert [tokenizer.decode(doc[1:-1]) for doc in documents] == texts

    mtimes = {shard: (out / shard).stat().st_mtime_ns for shard in expected}
    assert main([str(raw), "--output", str(out), "--tokenizer", str(tokenizer_file), "--workers", "1"]) == 0
    assert "wrote 0 shards (4 already done)" in capsys.readouterr().out
    assert {shard: (out / shard).stat().st_mtime_ns for shard in expected} == mtimes
    assert load_counts(out / COUNTS_FILE) == counts

    # The loader reads the prepared dataset as is: EOS is already there, so none is added.
    loader = build_dataloader(DataConfig(datasets=[str(out)], num_workers=0), rank=0, world_size=1, seq_len=64, micro_batch_size=4, vocab_size=400)
    batch = next(iter(loader))
    ids, labels = batch["input_ids"], batch["labels"]
    assert ((labels == -100) == (ids == eos)).all() and batch["doc_ids"].max() > 0


def test_prepare_corpus_function_and_special_token_resolution(tmp_path, tokenizer_file):
    raw = tmp_path / "raw.jsonl"
    raw.write_text(json.dumps({"content": "one two three"}) + "\n" + json.dumps({"content": ""}) + "\n")
    (tmp_path / "tok").mkdir()
    tokenizer_copy = tmp_path / "tok" / "tokenizer.json"
    tokenizer_copy.write_text(tokenizer_file.read_text())
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<s>"}}))
    stats = prepare_corpus([raw], tmp_path / "out", tokenizer_copy, text_field="content", num_workers=1, progress=False)
    assert (stats.files_written, stats.documents, stats.empty_documents) == (1, 1, 1)
    assert stats.eos_token_id == Tokenizer.from_file(str(tokenizer_file)).token_to_id("<s>")
    assert read_shard(tmp_path / "out" / "raw.arrow")[0][-1] == stats.eos_token_id


@pytest.mark.parametrize(
    "setup, arguments, message",
    [
        (lambda raw: None, ["--eos-token", "</s>"], "input .*missing.* does not exist"),
        (lambda raw: (raw / "a.jsonl").write_text('{"body": "x"}\n'), [], r"a\.jsonl: line 1 has no field 'text'"),
        (lambda raw: (raw / "a.jsonl").write_text("not json\n"), [], r"a\.jsonl: line 1 is not JSON"),
        (lambda raw: (raw / "a.jsonl").write_text('{"text": 5}\n'), [], r"a\.jsonl: line 1: field 'text' holds int"),
        (lambda raw: pq.write_table(pa.table({"body": ["x"]}), raw / "b.parquet"), [], r"b\.parquet: no text column 'text'"),
        (lambda raw: (raw / "a.txt").write_text("x"), ["--eos-token", "<nope>"], "EOS token '<nope>' is not in the vocabulary"),
    ],
)
def test_bad_input_fails_naming_the_file_or_option(tmp_path, tokenizer_file, setup, arguments, message):
    raw = tmp_path / "raw"
    raw.mkdir()
    setup(raw)
    source = raw if any(raw.iterdir()) else tmp_path / "missing"
    with pytest.raises(ValueError, match=message):
        prepare_corpus([source], tmp_path / "out", tokenizer_file, num_workers=1, progress=False, **_keywords(arguments))
    with pytest.raises(SystemExit) as exit_info:
        main([str(source), "--output", str(tmp_path / "out"), "--tokenizer", str(tokenizer_file), "--workers", "1", *arguments])
    assert exit_info.value.code == 2


def _keywords(arguments: list[str]) -> dict:
    return {"eos_token": arguments[1]} if arguments else {}


def test_missing_tokenizer_is_reported(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="tokenizer file .*nope.json does not exist"):
        prepare_corpus([tmp_path / "a.txt"], tmp_path / "out", tmp_path / "nope.json", progress=False)
