"""The `data:` section of the job config, and its cheap up-front validation."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from data_loader.shards import dataset_shard_files, read_counts_file, read_token_column_type


@dataclass
class DataConfig:
    """Where the token shards are and how they are mixed, shuffled and delivered."""

    root: str = ""
    """Base directory that relative entries of `datasets` are resolved against ("" = working directory)."""
    datasets: list[str] = field(default_factory=list)
    """Dataset directories (relative to `root` or absolute), each holding `.arrow` / `.parquet` token shards."""
    weights: list[float] = field(default_factory=list)
    """Sampling weight per dataset, same length as `datasets`, normalised to sum 1 ([] = equal weights)."""
    token_column: str = "tokens"
    """Name of the integer token column in every shard."""
    seed: int = 0
    """Seed of the file, document and sample shuffles; fixed for the life of a run."""
    num_workers: int = 1
    """Dataloader worker processes per rank (0 = read in the training process)."""
    shuffle_buffer: int = 0
    """Samples per dataset shuffled together as one block (0 or 1 = stream order)."""
    bos_token_id: Optional[int] = None
    """Token inserted at the start of every document (None = shards are used as stored)."""
    eos_token_id: Optional[int] = None
    """Token appended after every document; leave None for shards that already end documents with EOS (as `prepare` writes them)."""
    pin_memory: bool = True
    """Pin batches in page-locked memory when CUDA is available."""

    def dataset_paths(self) -> list[Path]:
        """Absolute-or-cwd-relative directory of each dataset, in `datasets` order."""
        root = Path(self.root) if self.root else Path()
        return [Path(name) if Path(name).is_absolute() else root / name for name in self.datasets]

    def normalized_weights(self) -> list[float]:
        """The weights scaled to sum 1 (equal weights when `weights` is empty)."""
        weights = list(self.weights) if self.weights else [1.0] * len(self.datasets)
        total = math.fsum(weights)
        return [w / total for w in weights]

    def validate(self) -> None:
        """Check fields, paths, shard listings and the token column; raise ValueError naming the culprit.

        Cheap: reads directory listings, counts files and one shard footer per dataset.
        """
        if not isinstance(self.datasets, list) or not self.datasets:
            raise ValueError("data.datasets: give at least one dataset directory")
        if not all(isinstance(name, str) and name for name in self.datasets):
            raise ValueError(f"data.datasets: every entry must be a non-empty path string, got {self.datasets!r}")
        if len(set(self.datasets)) != len(self.datasets):
            raise ValueError(f"data.datasets: duplicate entries in {self.datasets!r}")
        if self.weights:
            if len(self.weights) != len(self.datasets):
                raise ValueError(
                    f"data.weights: {len(self.weights)} weights for {len(self.datasets)} datasets "
                    f"({self.weights!r} vs {self.datasets!r})"
                )
            for name, weight in zip(self.datasets, self.weights):
                if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                    raise ValueError(f"data.weights: weight of {name!r} is {weight!r}, not a finite number")
                if weight < 0:
                    raise ValueError(f"data.weights: weight of {name!r} is negative ({weight})")
            if math.fsum(self.weights) <= 0:
                raise ValueError(f"data.weights: at least one weight must be positive, got {self.weights!r}")
        if not isinstance(self.token_column, str) or not self.token_column:
            raise ValueError("data.token_column: must be a non-empty column name")
        for name in ("seed", "num_workers", "shuffle_buffer"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"data.{name}: expected a non-negative integer, got {value!r}")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"data.{name}: expected None or a non-negative token id, got {value!r}")
        if self.root and not Path(self.root).is_dir():
            raise ValueError(f"data.root: directory {self.root} does not exist")
        for name, path in zip(self.datasets, self.dataset_paths()):
            if not path.is_dir():
                raise ValueError(f"data.datasets: dataset directory {path} (entry {name!r}) does not exist")
            files = dataset_shard_files(path)
            read_counts_file(path, files)
            read_token_column_type(path / files[0], self.token_column)
