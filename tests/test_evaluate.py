"""Validation during training: val_loss (and greedy samples) in metrics.jsonl at the configured
steps, the same training trajectory with and without it, bad validation configs; then
`fms-bamba generate` on the run the trainer left."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoints_tools.common import write_model_checkpoint
from fms_bamba import default_corpus
from fms_bamba.cli import main as cli_main
from fms_bamba.config import ConfigError, load_job_config
from fms_bamba.evaluate import Validator
from fms_bamba.model import Bamba, BambaConfig
from fms_bamba.train import train


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The built-in corpus machinery on the first 20 stdlib files."""
    cache = tmp_path_factory.mktemp("cache")
    sources = default_corpus.stdlib_sources()[:20]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FMS_BAMBA_CACHE", str(cache))
        patch.setattr(default_corpus, "stdlib_sources", lambda: sources)
        return default_corpus.default_corpus()


def overrides(run_dir: Path, corpus: Path, **extra) -> dict:
    data = {"root": str(corpus), "datasets": [default_corpus.DATASET_NAME], "num_workers": 0}
    return {"job.run_dir": str(run_dir), **{f"data.{key}": value for key, value in data.items()},
            "model.tokenizer": str(corpus / "tokenizer.json"), "training.seq_len": 64,
            "training.micro_batch_size": 2, "training.steps": 6, "lr_scheduler.warmup_steps": 2,
            "metrics.log_interval": 2, "checkpoint.interval": 6, "training.device": "cpu", **extra}


def validation(corpus: Path, **extra) -> dict:
    # another seed of the same shards stands in for a held-out set
    return {"validation.enable": True, "validation.interval": 4, "validation.batches": 2,
            "validation.data.root": str(corpus), "validation.data.datasets": [default_corpus.DATASET_NAME],
            "validation.data.seed": 7, **extra}


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_val_loss_at_the_configured_steps_leaves_training_unchanged(corpus, tmp_path, capsys):
    plain_dir, validated_dir = tmp_path / "plain", tmp_path / "validated"
    train(load_job_config(None, overrides(plain_dir, corpus)))
    prompts = ["def main(", "import "]
    train(load_job_config(None, overrides(validated_dir, corpus, **validation(
        corpus, **{"validation.prompts": prompts, "validation.max_new_tokens": 5}))))
    out = capsys.readouterr().out

    plain, validated = read_metrics(plain_dir), read_metrics(validated_dir)
    assert [r["loss"] for r in validated] == [r["loss"] for r in plain]
    assert [r["grad_norm"] for r in validated] == [r["grad_norm"] for r in plain]
    assert [r["step"] for r in validated if "val_loss" in r] == [4]
    record = next(r for r in validated if "val_loss" in r)
    # a 4096-token model a few steps in: near the uniform loss ln(4096) = 8.3, and finite
    assert math.isfinite(record["val_loss"]) and 4 < record["val_loss"] < 9
    assert len(record["val_samples"]) == 2 and all(isinstance(text, str) for text in record["val_samples"])
    assert f"step 4 | val_loss {record['val_loss']:.4f}" in out
    assert f"  {prompts[0]!r} -> {record['val_samples'][0]!r}" in out

    # the run directory the trainer left is a SOURCE for generate, tokenizer included
    assert cli_main(["generate", str(validated_dir), "--prompt", "def main(", "--max-new-tokens", "4",
                     "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("def main(")


@pytest.mark.parametrize("extra, message", [
    ({"validation.interval": 3}, "validation.interval (3) must be a multiple of metrics.log_interval (2)"),
    ({"validation.data.datasets": []}, "validation.data.datasets"),
    ({"validation.batches": 0}, "validation.batches must be >= 1"),
    ({"validation.prompts": [""]}, "validation.prompts"),
])
def test_bad_validation_config_fails_before_training(corpus, tmp_path, extra, message):
    cfg = load_job_config(None, overrides(tmp_path / "run", corpus, **validation(corpus, **extra)))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_two_processes_validate_what_one_process_does(corpus, tmp_path):
    """2 ranks x micro-batch 2 read the same 8 validation sequences as 1 rank x micro-batch 4, and
    train the same steps from the same weights (global batch 4); the all-reduced, token-weighted
    val_loss agrees, and the samples decode through FSDP2 shards split over two ranks."""
    torch.manual_seed(0)
    config = BambaConfig.from_preset("tiny", max_seq_len=64)
    start = write_model_checkpoint(tmp_path / "start", Bamba(config).state_dict(), config, {"format": "test"})
    settings = {"training.steps": 2, "training.global_batch_sequences": 4, "checkpoint.enable": False,
                "checkpoint.init_from": str(start), "checkpoint.init_load": "model",
                **validation(corpus, **{"validation.interval": 2, "validation.prompts": ["def "],
                                        "validation.max_new_tokens": 3})}
    train(load_job_config(None, overrides(tmp_path / "one", corpus, **settings, **{"training.micro_batch_size": 4})))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "fms_bamba.cli", "train",
               *[f"--{key}={json.dumps(value) if isinstance(value, list) else value}"
                 for key, value in overrides(tmp_path / "two", corpus, **settings).items()]]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    one, two = read_metrics(tmp_path / "one")[-1], read_metrics(tmp_path / "two")[-1]
    assert one["step"] == two["step"] == 2
    assert two["val_loss"] == pytest.approx(one["val_loss"], abs=1e-3)
    assert len(two["val_samples"]) == 1


def test_validator_names_an_unreadable_tokenizer(tmp_path):
    (tmp_path / "empty").mkdir()
    malformed = tmp_path / "tokenizer.json"
    malformed.write_text("{not json")
    model = Bamba(BambaConfig.from_preset("tiny"))
    for path, message in [(tmp_path / "empty", "does not exist"), (malformed, "is not a tokenizers tokenizer.json")]:
        cfg = load_job_config(None, {"model.tokenizer": str(path), "validation.enable": True,
                                     "validation.prompts": ["def "]})
        with pytest.raises((OSError, ValueError), match=f"model.tokenizer: {path}.* {message}"):
            Validator(cfg, model, rank=0, world_size=1, device=torch.device("cpu"))
