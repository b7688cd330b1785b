"""The built-in corpus of `fms-bamba train` with no arguments: the Python standard library's own
`.py` files, which every machine that runs this code has. On first use a 4096-token byte-level
BPE tokenizer is trained on them and they are tokenized into loader shards, under
`$FMS_BAMBA_CACHE` (default ~/.cache/fms-bamba). The cache entry appears by one rename, so a
crash never leaves half of one, and a file lock lets concurrent ranks build it once."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import sysconfig
from pathlib import Path

VOCAB_SIZE = 4096
EOS_TOKEN = "<|endoftext|>"
DATASET_NAME = "python-stdlib"
# Tests, demos and vendored third-party code add bulk, not variety.
SKIPPED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo"}


def cache_root() -> Path:
    return Path(os.environ.get("FMS_BAMBA_CACHE", Path.home() / ".cache" / "fms-bamba"))


def stdlib_sources() -> list[Path]:
    """The stdlib's .py files in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return [path for path in sorted(root.rglob("*.py"))
            if not SKIPPED_DIRS.intersection(path.relative_to(root).parts)]


def default_corpus() -> Path:
    """Directory holding `tokenizer.json` and the dataset `python-stdlib/`, built on first use."""
    name = f"stdlib-py{sys.version_info.major}{sys.version_info.minor}-bpe{VOCAB_SIZE}"
    final = cache_root() / name
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not final.is_dir():
            building = final.parent / f"{name}.tmp-{os.getpid()}"
            shutil.rmtree(building, ignore_errors=True)
            print(f"building the default corpus (once) in {final} ...", flush=True)
            _build(building)
            os.rename(building, final)
    return final


def _build(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from data_loader.prepare import prepare_corpus

    out.mkdir(parents=True)
    sources = stdlib_sources()
    # One JSON line per source file: each file is one document.
    documents = out / "documents.jsonl"
    with open(documents, "w") as f:
        for path in sources:
            f.write(json.dumps({"text": path.read_text(encoding="utf-8", errors="replace")}) + "\n")

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train([str(p) for p in sources], trainer)
    tokenizer.save(str(out / "tokenizer.json"))

    prepare_corpus([documents], out / DATASET_NAME, out / "tokenizer.json", text_field="text",
                   eos_token=EOS_TOKEN, progress=False)
    documents.unlink()
