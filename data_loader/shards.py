"""Token shards on disk: listing, the per-dataset counts file, and memory-mapped readers.

A dataset is a directory (searched recursively) of shard files:

- `*.arrow`: an Arrow IPC *file*, one record batch per document, whose integer token column
  holds one token per row (the layout the original Bamba trainer reads). Memory-mapped; a
  document is a numpy view into the map, located through its record batch's buffer offset.
- `*.parquet`: one row per document, the token column a list of integers. Read one row group
  at a time (Parquet pages are compressed, so they cannot be views into a map).

An optional `counts.csv` in the dataset directory (`file,documents,tokens` per shard, paths
relative to the directory) lets the loader start without opening every shard.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

SHARD_SUFFIXES = (".arrow", ".parquet")
COUNTS_FILE = "counts.csv"
COUNTS_HEADER = ["file", "documents", "tokens"]


def find_shard_files(dataset_dir: Path) -> list[str]:
    """Shard paths under `dataset_dir`, relative to it (POSIX form), sorted."""
    return sorted(
        path.relative_to(dataset_dir).as_posix()
        for path in dataset_dir.rglob("*")
        if path.suffix in SHARD_SUFFIXES and path.is_file()
    )


def dataset_shard_files(dataset_dir: Path) -> list[str]:
    """`find_shard_files` of a dataset, which must hold at least one shard."""
    files = find_shard_files(dataset_dir)
    if not files:
        raise ValueError(f"data.datasets: dataset directory {dataset_dir} holds no .arrow or .parquet shards")
    return files


def load_counts(counts_path: Path) -> dict[str, tuple[int, int]]:
    """`{file: (documents, tokens)}` as a counts file lists them."""
    counts: dict[str, tuple[int, int]] = {}
    with open(counts_path, newline="") as handle:
        rows = csv.reader(handle)
        if next(rows, None) != COUNTS_HEADER:
            raise ValueError(f"{counts_path}: first line must be the header {','.join(COUNTS_HEADER)}")
        for line_number, row in enumerate(rows, start=2):
            try:
                name, documents, tokens = row[0], int(row[1]), int(row[2])
            except (IndexError, ValueError):
                raise ValueError(f"{counts_path}: line {line_number} is not 'file,documents,tokens': {row!r}") from None
            if documents < 0 or tokens < 0:
                raise ValueError(f"{counts_path}: line {line_number} has a negative count")
            counts[name] = (documents, tokens)
    return counts


def read_counts_file(dataset_dir: Path, files: list[str]) -> dict[str, tuple[int, int]] | None:
    """The dataset's counts (see `load_counts`), or None when it has no counts file.

    The counts file must list exactly the shards present, so a stale one cannot hide data.
    """
    counts_path = dataset_dir / COUNTS_FILE
    if not counts_path.exists():
        return None
    counts = load_counts(counts_path)
    listed, present = set(counts), set(files)
    if listed != present:
        raise ValueError(
            f"{counts_path}: does not match the shards in {dataset_dir} "
            f"(missing from counts: {sorted(present - listed)[:5]}, listed but absent: {sorted(listed - present)[:5]}); "
            f"delete or regenerate it"
        )
    return counts


def write_counts_file(dataset_dir: Path, counts: dict[str, tuple[int, int]]) -> Path:
    """Write `counts.csv` for the shards of `dataset_dir` (atomically)."""
    counts_path = dataset_dir / COUNTS_FILE
    tmp_path = counts_path.with_suffix(".csv.tmp")
    with open(tmp_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COUNTS_HEADER)
        for name in sorted(counts):
            writer.writerow([name, *counts[name]])
    tmp_path.replace(counts_path)
    return counts_path


def read_token_column_type(path: Path, column: str) -> pa.DataType:
    """Integer type of the token column, read from the shard's footer/schema only."""
    try:
        if path.suffix == ".arrow":
            schema = ipc.open_file(pa.memory_map(str(path))).schema
        else:
            schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as error:
        raise ValueError(f"{path}: corrupt or truncated {path.suffix[1:]} shard ({error})") from None
    if column not in schema.names:
        raise ValueError(f"{path}: no token column {column!r} (columns: {schema.names}); set data.token_column")
    column_type = schema.field(column).type
    if path.suffix == ".parquet":
        if not (pa.types.is_list(column_type) or pa.types.is_large_list(column_type)):
            raise ValueError(f"{path}: column {column!r} is {column_type}, expected a list of integer tokens per row")
        column_type = column_type.value_type
    if not pa.types.is_integer(column_type):
        raise ValueError(f"{path}: column {column!r} holds {column_type}, expected integer token ids")
    return column_type


class ArrowShard:
    """A memory-mapped Arrow IPC shard; `tokens(doc)` is a zero-copy view."""

    def __init__(self, path: Path, column: str):
        self.path = path
        self.dtype = np.dtype(read_token_column_type(path, column).to_pandas_dtype())
        try:
            self._buffer = pa.memory_map(str(path)).read_buffer()
            reader = ipc.open_file(self._buffer)
            column_index = reader.schema.get_field_index(column)
            batches = [reader.get_batch(i).column(column_index) for i in range(reader.num_record_batches)]
        except (pa.ArrowException, OSError) as error:
            raise ValueError(f"{path}: corrupt or truncated Arrow IPC file ({error})") from None
        base, size, itemsize = self._buffer.address, self._buffer.size, self.dtype.itemsize
        self.lengths = np.fromiter((len(array) for array in batches), np.int64, len(batches))
        self._offsets = np.zeros(len(batches), np.int64)
        for doc, array in enumerate(batches):
            if array.null_count:
                raise ValueError(f"{path}: document {doc} has null tokens")
            if len(array):
                offset = array.buffers()[1].address - base + array.offset * itemsize
                # A compressed IPC file decompresses into fresh memory outside the map.
                if not 0 <= offset <= size - len(array) * itemsize:
                    raise ValueError(f"{path}: document {doc} is not stored uncompressed in the file; rewrite it uncompressed")
                self._offsets[doc] = offset
        self._bytes = np.frombuffer(self._buffer, np.uint8)

    def tokens(self, doc: int) -> np.ndarray:
        start = self._offsets[doc]
        return self._bytes[start : start + self.lengths[doc] * self.dtype.itemsize].view(self.dtype)


class ParquetShard:
    """A Parquet shard, one row per document; keeps one decoded row group at a time."""

    def __init__(self, path: Path, column: str):
        self.path = path
        self._column = column
        read_token_column_type(path, column)
        try:
            self._file = pq.ParquetFile(path, memory_map=True)
            row_group_offsets = [self._read_row_group(rg)[1] for rg in range(self._file.num_row_groups)]
        except (pa.ArrowException, OSError) as error:
            raise ValueError(f"{path}: corrupt or truncated Parquet file ({error})") from None
        self.lengths = np.concatenate([np.diff(offsets) for offsets in row_group_offsets] or [np.zeros(0, np.int64)])
        rows = [len(offsets) - 1 for offsets in row_group_offsets]
        self._row_group_of_doc = np.repeat(np.arange(len(rows)), rows)
        self._first_doc = np.concatenate([[0], np.cumsum(rows)])
        self._starts = [offsets[:-1] for offsets in row_group_offsets]
        self._cached_row_group = (-1, np.zeros(0, np.int64))

    def _read_row_group(self, row_group: int) -> tuple[np.ndarray, np.ndarray]:
        chunked = self._file.read_row_group(row_group, columns=[self._column]).column(0)
        lists = chunked.combine_chunks() if chunked.num_chunks != 1 else chunked.chunk(0)
        if lists.null_count:
            raise ValueError(f"{self.path}: row group {row_group} has null documents")
        offsets = lists.offsets.to_numpy().astype(np.int64)
        values = lists.values.to_numpy(zero_copy_only=False)
        return values[offsets[0] : offsets[-1]], offsets - offsets[0]

    def tokens(self, doc: int) -> np.ndarray:
        row_group = self._row_group_of_doc[doc]
        if self._cached_row_group[0] != row_group:
            self._cached_row_group = (row_group, self._read_row_group(row_group)[0])
        start = self._starts[row_group][doc - self._first_doc[row_group]]
        return self._cached_row_group[1][start : start + self.lengths[doc]]


def open_shard(path: Path, column: str) -> ArrowShard | ParquetShard:
    return ArrowShard(path, column) if path.suffix == ".arrow" else ParquetShard(path, column)


@dataclass
class DatasetIndex:
    """What the loader needs to know about one dataset before reading it: per-shard sizes."""

    name: str
    """The entry in `DataConfig.datasets` (also the dataset's key in loader states)."""
    path: Path
    files: list[str]
    documents: np.ndarray
    """Documents per shard, in `files` order."""
    tokens: np.ndarray
    """Stored tokens per shard, in `files` order."""
    from_counts_file: bool

    def open(self, file_number: int, column: str) -> ArrowShard | ParquetShard:
        """Open one shard and check it against the sizes recorded at start-up."""
        shard = open_shard(self.path / self.files[file_number], column)
        documents, tokens = len(shard.lengths), int(shard.lengths.sum())
        if (documents, tokens) != (self.documents[file_number], self.tokens[file_number]):
            source = COUNTS_FILE if self.from_counts_file else "start-up scan"
            raise ValueError(
                f"{shard.path}: holds {documents} documents / {tokens} tokens but {source} recorded "
                f"{self.documents[file_number]} / {self.tokens[file_number]}; the shard changed or is corrupt"
            )
        return shard


def index_dataset(name: str, path: Path, column: str) -> DatasetIndex:
    """Shard sizes of one dataset, from its counts file or else by reading every shard's index."""
    files = dataset_shard_files(path)
    counts = read_counts_file(path, files)
    if counts is None:
        shards = (open_shard(path / file, column).lengths for file in files)
        counts = {file: (len(lengths), int(lengths.sum())) for file, lengths in zip(files, shards)}
    documents = np.array([counts[file][0] for file in files], np.int64)
    tokens = np.array([counts[file][1] for file in files], np.int64)
    if tokens.sum() == 0:
        raise ValueError(f"data.datasets: dataset {path} holds no tokens")
    return DatasetIndex(name, path, files, documents, tokens, from_counts_file=counts is not None)
