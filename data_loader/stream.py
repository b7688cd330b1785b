"""One dataset as an endless token stream: epoch after epoch, each in its own shuffled order.

Epoch `e` lays the dataset's shards end to end in a permutation seeded by (seed, dataset, e), and
the documents of each shard in a permutation seeded by (seed, dataset, e, shard); every document
is [BOS] tokens [EOS] (BOS / EOS only when configured). A position in the stream is therefore an
integer, and locating it needs only per-shard token totals plus the documents of the one shard
it falls in — never an index over the whole corpus.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from typing import Callable, Hashable, Iterator, NamedTuple, Optional

import numpy as np

from data_loader.shards import ArrowShard, DatasetIndex, ParquetShard

# Distinct first keys keep the seed streams of the different shuffles apart.
FILE_ORDER, DOCUMENT_ORDER, SAMPLE_ORDER = 0, 1, 2
# Shards of one dataset a stream keeps open: a shuffle block spans a few adjacent ones.
OPEN_SHARDS = 4


def seeded_rng(seed: int, name: str, *keys: int) -> np.random.Generator:
    """A generator that depends only on the run seed, the dataset name and `keys`."""
    return np.random.default_rng([seed, zlib.crc32(name.encode()), *keys])


class LRUCache:
    """Keeps the `size` most recently used values of `make(key)`."""

    def __init__(self, size: int):
        self.size = size
        self._values: OrderedDict = OrderedDict()

    def get(self, key: Hashable, make: Callable):
        if key in self._values:
            self._values.move_to_end(key)
            return self._values[key]
        value = self._values[key] = make(key)
        if len(self._values) > self.size:
            self._values.popitem(last=False)
        return value


class Segment(NamedTuple):
    """Tokens [start, stop) of one document as it appears in the stream (BOS/EOS included)."""

    epoch: int
    file: int
    document: int
    start: int
    stop: int
    length: int
    """The document's length in the stream, BOS/EOS included."""


class DatasetStream:
    """Reads any span of one dataset's stream; caches a few open shards and shuffles."""

    def __init__(
        self,
        index: DatasetIndex,
        *,
        seed: int,
        token_column: str,
        bos_token_id: Optional[int],
        eos_token_id: Optional[int],
        vocab_size: Optional[int] = None,
    ):
        self.index = index
        self.seed = seed
        self.token_column = token_column
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.vocab_size = vocab_size
        self.added_per_document = (bos_token_id is not None) + (eos_token_id is not None)
        self.file_tokens = index.tokens + index.documents * self.added_per_document
        self.epoch_tokens = int(self.file_tokens.sum())
        self._shards = LRUCache(OPEN_SHARDS)
        self._document_orders = LRUCache(4 * OPEN_SHARDS)
        self._file_orders = LRUCache(2)

    def __getstate__(self) -> dict:
        # Worker processes get the sizes and settings, never open memory maps.
        state = self.__dict__.copy()
        for cache in ("_shards", "_document_orders", "_file_orders"):
            state[cache] = LRUCache(state[cache].size)
        return state

    def close_shards(self) -> None:
        """Drop the open shards (their memory maps); the small per-shard document orders stay cached."""
        self._shards = LRUCache(self._shards.size)

    def shard(self, file: int) -> ArrowShard | ParquetShard:
        return self._shards.get(file, lambda f: self.index.open(f, self.token_column))

    def _file_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        def make(epoch: int) -> tuple[np.ndarray, np.ndarray]:
            order = seeded_rng(self.seed, self.index.name, FILE_ORDER, epoch).permutation(len(self.file_tokens))
            return order, np.cumsum(self.file_tokens[order])

        return self._file_orders.get(epoch, make)

    def _document_order(self, file: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        def make(key: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
            lengths = self.shard(file).lengths + self.added_per_document
            order = seeded_rng(self.seed, self.index.name, DOCUMENT_ORDER, epoch, file).permutation(len(lengths))
            return order, np.cumsum(lengths[order])

        return self._document_orders.get((file, epoch), make)

    def segments(self, position: int, length: int) -> Iterator[Segment]:
        """The document pieces that make up stream tokens [position, position + length)."""
        end = position + length
        while position < end:
            epoch, offset = divmod(position, self.epoch_tokens)
            files, file_ends = self._file_order(epoch)
            slot = int(np.searchsorted(file_ends, offset, side="right"))
            file = int(files[slot])
            offset -= int(file_ends[slot - 1]) if slot else 0
            documents, document_ends = self._document_order(file, epoch)
            index = int(np.searchsorted(document_ends, offset, side="right"))
            document_start = int(document_ends[index - 1]) if index else 0
            start = offset - document_start
            # The following documents of this shard come next in the stream: walk them in order.
            while position < end and index < len(documents):
                document_end = int(document_ends[index])
                stop = min(document_end - document_start, start + end - position)
                if stop > start:
                    yield Segment(epoch, file, int(documents[index]), start, stop, document_end - document_start)
                position += stop - start
                index, document_start, start = index + 1, document_end, 0

    def documents_finished(self, position: int) -> int:
        """Documents (over all epochs) whose last token lies before stream `position`."""
        epoch, offset = divmod(position, self.epoch_tokens)
        files, file_ends = self._file_order(epoch)
        slot = int(np.searchsorted(file_ends, offset, side="right"))
        finished = epoch * int(self.index.documents.sum()) + int(self.index.documents[files[:slot]].sum())
        if slot < len(files):
            _, document_ends = self._document_order(int(files[slot]), epoch)
            offset -= int(file_ends[slot - 1]) if slot else 0
            finished += int(np.searchsorted(document_ends, offset, side="right"))
        return finished

    def stored_tokens(self, segment: Segment) -> int:
        """How many of the segment's tokens come from the shard (not an added BOS/EOS)."""
        bos = self.bos_token_id is not None
        stored_length = segment.length - self.added_per_document
        return max(0, min(segment.stop - bos, stored_length) - max(segment.start - bos, 0))

    def read(self, position: int, out: np.ndarray) -> list[int]:
        """Fill `out` with the stream from `position`; return the lengths of its document pieces."""
        piece_lengths = []
        written = 0
        bos = self.bos_token_id is not None
        for segment in self.segments(position, len(out)):
            dest = out[written : written + segment.stop - segment.start]
            filled = 0
            if bos and segment.start == 0:
                dest[0] = self.bos_token_id
                filled = 1
            piece = self._stored_piece(segment)
            dest[filled : filled + len(piece)] = piece
            if filled + len(piece) < len(dest):  # the only token left is the appended EOS
                dest[-1] = self.eos_token_id
            piece_lengths.append(len(dest))
            written += len(dest)
        return piece_lengths

    def _stored_piece(self, segment: Segment) -> np.ndarray:
        bos = self.bos_token_id is not None
        stored = self.shard(segment.file).tokens(segment.document)
        return stored[max(segment.start - bos, 0) : max(segment.stop - bos, 0)]

    def check_vocabulary(self, position: int, length: int) -> None:
        """Raise naming the shard and document if stream tokens [position, +length) leave the vocabulary."""
        for segment in self.segments(position, length):
            piece = self._stored_piece(segment)
            if len(piece) and (int(piece.min()) < 0 or int(piece.max()) >= self.vocab_size):
                bad = int(piece.min()) if piece.min() < 0 else int(piece.max())
                raise ValueError(
                    f"{self.shard(segment.file).path}: document {segment.document} holds token id {bad}, "
                    f"outside the model's vocabulary [0, {self.vocab_size})"
                )
