"""The job config: every YAML in configs/ loads, overrides convert, bad input names the problem."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from fms_bamba import cli
from fms_bamba.config import (ConfigError, JobConfig, config_to_dict, field_docs, load_job_config,
                             save_job_config)

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_configs_exist():
    names = {path.name for path in CONFIGS}
    assert {"tiny.yaml", "bamba-1b.yaml", "bamba-9b-stage1.yaml", "bamba-9b-stage2-anneal.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads(path):
    cfg = load_job_config(path)
    assert isinstance(cfg, JobConfig)


def dotted_keys(mapping: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in mapping.items():
        keys.add(prefix + key)
        if isinstance(value, dict):
            keys |= dotted_keys(value, f"{prefix}{key}.")
    return keys


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_mirrors_job_config(path):
    """Each file lists every field of JobConfig, so it shows all a user can set."""
    assert dotted_keys(yaml.safe_load(path.read_text())) == dotted_keys(config_to_dict(JobConfig()))


def test_tiny_yaml_is_the_default():
    assert load_job_config(Path(__file__).parent.parent / "configs" / "tiny.yaml") == JobConfig()


def test_stage_configs_follow_the_recipe():
    stage1 = load_job_config(Path(__file__).parent.parent / "configs" / "bamba-9b-stage1.yaml")
    assert len(stage1.data.datasets) == 19 and sum(stage1.data.weights) == 10000
    assert stage1.data.weights[stage1.data.datasets.index("cc_en_middle")] == 1835
    tokens_per_step = stage1.training.global_batch_sequences * stage1.training.seq_len
    assert tokens_per_step == 1_572_864
    assert 2e12 <= stage1.training.steps * tokens_per_step < 2e12 + tokens_per_step
    assert (stage1.optimizer.lr, stage1.optimizer.beta1, stage1.optimizer.beta2) == (3e-4, 0.9, 0.95)
    assert (stage1.optimizer.weight_decay, stage1.training.max_grad_norm) == (0.1, 1.0)
    assert (stage1.lr_scheduler.warmup_steps, stage1.lr_scheduler.decay, stage1.lr_scheduler.min_lr) == (2000, "cosine", 1e-5)
    assert stage1.lr_scheduler.warmup_shape == "linear"

    stage2 = load_job_config(Path(__file__).parent.parent / "configs" / "bamba-9b-stage2-anneal.yaml")
    assert stage2.checkpoint.init_from == stage1.job.run_dir
    assert stage2.checkpoint.init_load == "model+optimizer" and not stage2.checkpoint.init_keep_step
    assert dict(zip(stage2.data.datasets, stage2.data.weights)) == {"cosmopedia-v2": 60, "fineweb-edu-dedup": 40}
    assert stage2.optimizer.lr == 2e-5 and stage2.lr_scheduler.decay == "cosine"
    assert (stage2.lr_scheduler.warmup_steps, stage2.lr_scheduler.min_lr) == (0, 0.0)
    assert (stage2.training.seq_len, stage2.training.global_batch_sequences) == (4096, 384)
    tokens = stage2.training.steps * stage2.training.global_batch_sequences * stage2.training.seq_len
    assert 200e9 <= tokens < 200e9 + tokens_per_step


def test_overrides_convert_to_field_types():
    cfg = load_job_config(None, {"training.steps": "12", "optimizer.lr": "3e-4", "model.doc_masking": "true",
                                 "data.datasets": ("a", "b"), "data.weights": "1,3", "job.run_dir": 7,
                                 "model.vocab_size": "null", "training.debug_nan_at_steps": [2, 3]})
    assert cfg.training.steps == 12 and cfg.optimizer.lr == 3e-4 and cfg.model.doc_masking is True
    assert cfg.data.datasets == ["a", "b"] and cfg.data.weights == [1.0, 3.0] and cfg.job.run_dir == "7"
    assert cfg.training.debug_nan_at_steps == [2, 3]
    from_strings = load_job_config(None, ["--training.steps=12", "optimizer.lr=3.0e-4", "model.vocab_size=null"])
    assert from_strings.training.steps == 12 and from_strings.optimizer.lr == 3e-4
    assert from_strings.model.vocab_size is None


def test_a_partial_section_keeps_the_job_defaults():
    cfg = load_job_config(None, {"checkpoint.keep_last": 1, "data.seed": 3})
    assert cfg.checkpoint.interval == JobConfig().checkpoint.interval == 100
    assert cfg.data.shuffle_buffer == JobConfig().data.shuffle_buffer == 1024


def test_overrides_apply_on_top_of_the_file(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("training:\n  steps: 5\n  seq_len: 64\ncheckpoint:\nmetrics:\n")
    cfg = load_job_config(path, {"training.steps": 9, "metrics.log_interval": 2})
    assert (cfg.training.steps, cfg.training.seq_len, cfg.metrics.log_interval) == (9, 64, 2)
    assert cfg.checkpoint == JobConfig().checkpoint  # an empty section is the defaults


def test_resolved_config_round_trips(tmp_path):
    cfg = load_job_config(Path(__file__).parent.parent / "configs" / "bamba-9b-stage1.yaml", {"training.steps": 3})
    save_job_config(cfg, tmp_path / "config.yaml")
    assert load_job_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize("text, overrides, message", [
    ("training:\n  stepz: 5\n", {}, r"unknown config key training\.stepz \(in .*job\.yaml\); did you mean training\.steps"),
    ("trainer:\n  steps: 5\n", {}, r"unknown config key trainer"),
    ("", {"training.nope": 1}, r"unknown config key training\.nope \(command-line override\)"),
    ("training:\n  steps: 5\n", {"training.steps": "x"}, r"training\.steps \(command-line override\) must be int"),
    ("", {"steps": 1}, r"must name section\.field"),
    ("training:\n  steps: many\n", {}, r"training\.steps .* must be int, got 'many'"),
    ("training: 5\n", {}, r"training must be a mapping"),
    ("[1, 2]\n", {}, r"must hold a mapping of sections"),
    ("training:\n  steps: [5\n", {}, r"is not valid YAML"),
    ("checkpoint:\n  interval: 0\n", {}, r"checkpoint\.interval must be >= 1"),
])
def test_bad_config_names_the_problem(tmp_path, text, overrides, message):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_job_config(path, overrides)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config file .*nope\.yaml does not exist"):
        load_job_config(tmp_path / "nope.yaml")


def dotted_fields(value, prefix=""):
    """(dotted key, owning dataclass, field name) of every leaf field of a config, nested sections included."""
    for item in dataclasses.fields(value):
        child = getattr(value, item.name)
        if dataclasses.is_dataclass(child):
            yield from dotted_fields(child, f"{prefix}{item.name}.")
        else:
            yield f"{prefix}{item.name}", type(value), item.name


def test_every_field_has_a_one_line_docstring():
    # JobConfig's own fields are its sections; every section class owns some leaf field.
    for cls in {JobConfig} | {owner for _, owner, _ in dotted_fields(JobConfig())}:
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


def test_train_help_lists_every_field_with_its_value_and_docstring(capsys):
    assert cli.main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: fms-bamba train [CONFIG]")
    for key, owner, name in dotted_fields(JobConfig()):
        assert f"\n  --{key}=" in text, key
        assert field_docs(owner)[name] in text, key
    assert "\n  --training.steps=300\n" in text and "\n  --model.vocab_size=null\n" in text

    # With a config, its values; and a missing config is the usual error, not a traceback.
    assert cli.main(["train", str(CONFIGS[0].parent / "bamba-9b-stage1.yaml"), "-h"]) == 0
    text = capsys.readouterr().out
    assert "\n  --model.preset=bamba-9b\n" in text and "\n  --training.steps=1271566\n" in text
    assert cli.main(["train", "missing.yaml", "--help"]) == 2
    assert "config file missing.yaml does not exist" in capsys.readouterr().err


def test_replace_fields_types_overrides_of_any_dataclass():
    """`--set field=value` of the benchmarks: values typed as the job config's, unknown names refused."""
    from fms_bamba.config import ConfigError, replace_fields
    from fms_bamba.model import BambaConfig

    base = BambaConfig.from_preset("tiny")
    config = replace_fields(base, ["loss_chunk_tokens=32", "norm_eps=1e-6", "bos_token_id=null", "n_layers=3",
                                   "attn_layer_indices=[1]"])
    assert (config.loss_chunk_tokens, config.norm_eps, config.bos_token_id) == (32, 1e-6, None)
    assert (config.n_layers, config.attn_layer_indices) == (3, (1,))
    assert config.hidden_size == base.hidden_size
    with pytest.raises(ConfigError, match="did you mean loss_chunk_tokens"):
        replace_fields(base, ["loss_chunk=32"])
    with pytest.raises(ConfigError, match=r"attn_layer_indices\[0\] must be int"):
        replace_fields(base, ["attn_layer_indices=[x]"])


def test_model_depth_overrides_build_a_shallower_preset():
    from fms_bamba.train import build_model_config

    cfg = load_job_config(None, ["model.preset=bamba-9b", "model.n_layers=4", "model.attn_layer_indices=[1]"])
    model = build_model_config(cfg)
    assert (model.n_layers, model.attn_layer_indices, model.hidden_size) == (4, (1,), 4096)
    assert build_model_config(load_job_config(None, ["model.preset=bamba-9b"])).n_layers == 32
    # The preset's attention blocks (9, 18, 27) do not fit 12 blocks: the error names the field.
    with pytest.raises(ConfigError, match=r"model: .*attn_layer_indices: 18 .*n_layers=12"):
        build_model_config(load_job_config(None, ["model.preset=bamba-9b", "model.n_layers=12"]))
