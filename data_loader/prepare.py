"""Tokenize raw corpora into the loader's shard format.

    python -m data_loader.prepare INPUT [INPUT ...] --output DIR --tokenizer tokenizer.json

Inputs are files or directories (searched recursively) of Dolma-style JSON lines (`*.jsonl`,
`*.json`, optionally `.gz`), Parquet files with a text column, or plain text files (`*.txt`,
one document per file). Each input file becomes one Arrow IPC shard in DIR (same relative path,
suffix `.arrow`), one record batch of uint32 tokens per document, EOS appended and BOS optionally
prepended; empty documents are skipped and counted. Finished shards are skipped on a rerun
(a shard is renamed into place only once complete), and DIR/counts.csv lists every shard.
"""

from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
from tokenizers import Tokenizer
from tqdm import tqdm

from data_loader.shards import COUNTS_FILE, find_shard_files, load_counts, open_shard, write_counts_file

JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
RAW_SUFFIXES = JSON_SUFFIXES + (".parquet", ".txt")
# When neither an argument nor tokenizer_config.json names a special token, the one of these in the vocabulary.
KNOWN_EOS_TOKENS = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>")
KNOWN_BOS_TOKENS = ("<|begin_of_text|>", "<s>", "<bos>")
ENCODE_BATCH_DOCUMENTS = 256
DEFAULT_WORKERS = max(1, (os.cpu_count() or 1) - 1)


@dataclass
class PrepareStats:
    """What one `prepare_corpus` call did."""

    files_written: int
    """Shards written by this call."""
    files_skipped: int
    """Shards already complete from an earlier run."""
    documents: int
    """Documents written by this call."""
    empty_documents: int
    """Documents skipped by this call because they hold no text."""
    tokens: int
    """Tokens written by this call, EOS (and BOS) included."""
    eos_token_id: int
    """EOS appended to every document."""
    bos_token_id: Optional[int]
    """BOS prepended to every document (None without add_bos)."""
    counts_file: Path
    """The dataset's counts.csv, covering every shard in the output directory."""


def raw_suffix(path: Path) -> Optional[str]:
    name = path.name.lower()
    return next((suffix for suffix in sorted(RAW_SUFFIXES, key=len, reverse=True) if name.endswith(suffix)), None)


def find_inputs(inputs: list[Path]) -> list[tuple[Path, str]]:
    """(raw file, shard name relative to the output directory) for every input file."""
    found: dict[str, Path] = {}
    for given in inputs:
        given = Path(given)
        if given.is_dir():
            files = [(path, path.relative_to(given)) for path in sorted(given.rglob("*")) if path.is_file() and raw_suffix(path)]
        elif given.is_file():
            if not raw_suffix(given):
                raise ValueError(f"prepare: {given} is not one of {', '.join(RAW_SUFFIXES)}")
            files = [(given, Path(given.name))]
        else:
            raise ValueError(f"prepare: input {given} does not exist")
        if not files:
            raise ValueError(f"prepare: input directory {given} holds no {', '.join(RAW_SUFFIXES)} files")
        for path, relative in files:
            shard = relative.as_posix()[: -len(raw_suffix(path))] + ".arrow"
            if shard in found:
                raise ValueError(f"prepare: {found[shard]} and {path} would both be written to shard {shard}")
            found[shard] = path
    return [(path, shard) for shard, path in found.items()]


def read_documents(path: Path, text_field: str) -> Iterator[str]:
    """The text of every document in one raw file, in file order."""
    suffix = raw_suffix(path)
    if suffix == ".txt":
        yield path.read_text(encoding="utf-8")
    elif suffix == ".parquet":
        parquet = pq.ParquetFile(path)
        if text_field not in parquet.schema_arrow.names:
            raise ValueError(f"{path}: no text column {text_field!r} (columns: {parquet.schema_arrow.names}); use --text-field")
        for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
            for text in batch.column(0).to_pylist():
                yield _text(text, path, text_field)
    else:
        opener = gzip.open if suffix.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as lines:
            for line_number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}: line {line_number} is not JSON ({error})") from None
                if not isinstance(record, dict) or text_field not in record:
                    raise ValueError(f"{path}: line {line_number} has no field {text_field!r}; use --text-field")
                yield _text(record[text_field], f"{path}: line {line_number}", text_field)


def _text(value: object, where: object, text_field: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {text_field!r} holds {type(value).__name__}, not text")
    return value


def resolve_special_token(tokenizer: Tokenizer, tokenizer_file: Path, kind: str, given: Optional[str | int]) -> Optional[int]:
    """Id of the BOS or EOS token: `given` (token or id), else tokenizer_config.json, else a known name."""
    if given is None:
        config_path = Path(tokenizer_file).with_name("tokenizer_config.json")
        if config_path.exists():
            given = json.loads(config_path.read_text()).get(f"{kind}_token")
            if isinstance(given, dict):
                given = given.get("content")
    if given is None:
        known = KNOWN_EOS_TOKENS if kind == "eos" else KNOWN_BOS_TOKENS
        present = [token for token in known if tokenizer.token_to_id(token) is not None]
        if len(present) != 1:
            raise ValueError(f"prepare: cannot tell the {kind.upper()} token of {tokenizer_file}; pass --{kind}-token")
        given = present[0]
    if isinstance(given, int) or (isinstance(given, str) and given.isdigit()):
        token_id = int(given)
        if not 0 <= token_id < tokenizer.get_vocab_size(with_added_tokens=True):
            raise ValueError(f"prepare: {kind.upper()} id {token_id} is outside the vocabulary of {tokenizer_file}")
        return token_id
    token_id = tokenizer.token_to_id(given)
    if token_id is None:
        raise ValueError(f"prepare: {kind.upper()} token {given!r} is not in the vocabulary of {tokenizer_file}")
    return token_id


_worker_tokenizer: Optional[Tokenizer] = None


def _load_tokenizer(tokenizer_file: str, threads: bool) -> None:
    global _worker_tokenizer
    if not threads:  # processes already use every core; rayon threads on top would oversubscribe
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = Tokenizer.from_file(tokenizer_file)


def _chunks(texts: Iterator[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for text in texts:
        chunk.append(text)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@dataclass(frozen=True)
class ShardTask:
    """One raw file to tokenize into one shard."""

    raw_path: Path
    out_path: Path
    text_field: str
    token_column: str
    eos_token_id: int
    bos_token_id: Optional[int]


def tokenize_file(task: ShardTask) -> tuple[int, int, int]:
    """Write one shard (renamed into place when complete); return (documents, tokens, empty documents)."""
    task.out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = task.out_path.with_name(task.out_path.name + ".tmp")
    schema = pa.schema([(task.token_column, pa.uint32())])
    prefix = [task.bos_token_id] if task.bos_token_id is not None else []
    documents = tokens = empty = 0
    with pa.OSFile(str(tmp_path), "wb") as sink, ipc.new_file(sink, schema) as writer:
        for texts in _chunks(read_documents(task.raw_path, task.text_field), ENCODE_BATCH_DOCUMENTS):
            kept = [text for text in texts if text.strip()]
            encodings = _worker_tokenizer.encode_batch(kept, add_special_tokens=False) if kept else []
            for encoding in encodings:
                if not encoding.ids:
                    empty += 1
                    continue
                ids = np.array(prefix + encoding.ids + [task.eos_token_id], np.uint32)
                writer.write_batch(pa.record_batch([pa.array(ids)], schema=schema))
                documents += 1
                tokens += len(ids)
            empty += len(texts) - len(kept)
    tmp_path.replace(task.out_path)
    return documents, tokens, empty


def _shard_counts(output_dir: Path, token_column: str, known: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """(documents, tokens) of every shard in output_dir: from this run, the old counts file, or the shard."""
    counts_path = output_dir / COUNTS_FILE
    previous = load_counts(counts_path) if counts_path.exists() else {}
    counts = {}
    for shard in find_shard_files(output_dir):
        if shard in known or shard in previous:
            counts[shard] = known.get(shard) or previous[shard]
        else:
            lengths = open_shard(output_dir / shard, token_column).lengths
            counts[shard] = (len(lengths), int(lengths.sum()))
    return counts


def prepare_corpus(
    inputs: list[Path],
    output_dir: Path,
    tokenizer_file: Path,
    *,
    text_field: str = "text",
    num_workers: int = DEFAULT_WORKERS,
    add_bos: bool = False,
    eos_token: Optional[str | int] = None,
    bos_token: Optional[str | int] = None,
    token_column: str = "tokens",
    progress: bool = True,
) -> PrepareStats:
    """Tokenize `inputs` (files or directories) into shards + counts.csv in `output_dir`.

    EOS/BOS: `eos_token` / `bos_token` (token string or id), else tokenizer_config.json next to
    the tokenizer file, else the one well-known name present in its vocabulary.
    """
    tokenizer_file = Path(tokenizer_file)
    if not tokenizer_file.is_file():
        raise ValueError(f"prepare: tokenizer file {tokenizer_file} does not exist")
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
    except Exception as error:  # tokenizers raises a bare Exception for unparsable files
        raise ValueError(f"prepare: {tokenizer_file} is not a HuggingFace tokenizer.json ({error})") from None
    if num_workers < 1:
        raise ValueError(f"prepare: num_workers must be >= 1, got {num_workers}")
    eos_token_id = resolve_special_token(tokenizer, tokenizer_file, "eos", eos_token)
    bos_token_id = resolve_special_token(tokenizer, tokenizer_file, "bos", bos_token) if add_bos else None
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    files = find_inputs(inputs)
    tasks = [
        ShardTask(raw, output_dir / shard, text_field, token_column, eos_token_id, bos_token_id)
        for raw, shard in files
        if not (output_dir / shard).exists()
    ]
    written: dict[str, tuple[int, int]] = {}
    documents = tokens = empty = 0
    bar = tqdm(total=len(tasks), unit="file", desc="prepare", disable=not progress)
    if num_workers == 1 or len(tasks) <= 1:
        _load_tokenizer(str(tokenizer_file), threads=True)
        results = map(tokenize_file, tasks)
        pool = None
    else:
        # fork: the workers need only the tokenizer file, and spawn would re-import torch in each.
        context = multiprocessing.get_context("fork")
        pool = context.Pool(min(num_workers, len(tasks)), initializer=_load_tokenizer, initargs=(str(tokenizer_file), False))
        results = pool.imap(tokenize_file, tasks)
    try:
        for task, (file_documents, file_tokens, file_empty) in zip(tasks, results):
            written[task.out_path.relative_to(output_dir).as_posix()] = (file_documents, file_tokens)
            documents, tokens, empty = documents + file_documents, tokens + file_tokens, empty + file_empty
            bar.update(1)
            bar.set_postfix(documents=documents, tokens=tokens)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    counts_file = write_counts_file(output_dir, _shard_counts(output_dir, token_column, written))
    return PrepareStats(
        files_written=len(tasks),
        files_skipped=len(files) - len(tasks),
        documents=documents,
        empty_documents=empty,
        tokens=tokens,
        eos_token_id=eos_token_id,
        bos_token_id=bos_token_id,
        counts_file=counts_file,
    )


def main(argv: Optional[list[str]] = None) -> int:
    prog = "fms-bamba prepare" if Path(sys.argv[0]).name == "fms-bamba" else "python -m data_loader.prepare"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", type=Path, help="raw files or directories")
    parser.add_argument("--output", required=True, type=Path, help="dataset directory to write shards into")
    parser.add_argument("--tokenizer", required=True, type=Path, help="a HuggingFace tokenizer.json")
    parser.add_argument("--text-field", default="text", help="JSON field / Parquet column holding the text")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="tokenizer processes")
    parser.add_argument("--add-bos", action="store_true", help="prepend BOS to every document")
    parser.add_argument("--eos-token", help="EOS token string or id (default: from the tokenizer)")
    parser.add_argument("--bos-token", help="BOS token string or id (default: from the tokenizer)")
    parser.add_argument("--token-column", default="tokens", help="name of the token column in the shards")
    args = parser.parse_args(argv)
    try:
        stats = prepare_corpus(
            args.inputs,
            args.output,
            args.tokenizer,
            text_field=args.text_field,
            num_workers=args.workers,
            add_bos=args.add_bos,
            eos_token=args.eos_token,
            bos_token=args.bos_token,
            token_column=args.token_column,
        )
    except ValueError as error:
        parser.exit(2, f"error: {error}\n")
    print(
        f"wrote {stats.files_written} shards ({stats.files_skipped} already done): {stats.documents} documents, "
        f"{stats.tokens} tokens, {stats.empty_documents} empty documents skipped; EOS id {stats.eos_token_id}"
        + (f", BOS id {stats.bos_token_id}" if stats.bos_token_id is not None else "")
        + f"; counts in {stats.counts_file}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
