"""bamba-ckpt: round trips through transformers' BambaForCausalLM and the original trainer's
(mamba-ssm) layout, a 2-process checkpoint consolidated on one process, inspect, and bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from checkpoints_tools.cli import main
from checkpoints_tools.common import write_model_checkpoint
from checkpoints_tools.original import config_from_original
from fms_bamba.checkpoint import list_checkpoints, load_tensors, read_meta, resolve_checkpoint
from fms_bamba.model import Bamba, BambaConfig

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4  # float32 logits


def tiny_config(**overrides) -> BambaConfig:
    # both block kinds; an MLP width mamba-ssm's GatedMLP keeps (a multiple of 128); chunk 16 < length
    return BambaConfig.from_preset("tiny", **{"mlp_hidden_size": 256, "mamba_chunk_size": 16, **overrides})


def random_model(config: BambaConfig, seed: int = 0) -> Bamba:
    torch.manual_seed(seed)
    model = Bamba(config).eval()
    with torch.no_grad():  # norms and D away from their init of 1, so a swapped tensor shows
        for name, param in model.named_parameters():
            if param.dim() == 1 and not name.endswith(("A_log", "dt_bias", "conv_bias")):
                param.add_(0.1 * torch.randn_like(param))
    return model


def ckpt(args: list) -> int:
    return main([str(arg) for arg in args])


def assert_logits_match(model: Bamba, hf_dir: Path) -> None:
    """transformers loads the exported folder and computes our model's logits."""
    hf = transformers.BambaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(ids) - hf(ids).logits).abs().max().item()
    assert diff <= TOLERANCE


@pytest.fixture(scope="module")
def model() -> Bamba:
    return random_model(tiny_config())


@pytest.fixture(scope="module")
def framework_ckpt(model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("framework") / "ckpt"
    return write_model_checkpoint(out, model.state_dict(), model.config, {"format": "test"})


# --------------------------------------------------------------------------------------------
# framework -> transformers -> framework
# --------------------------------------------------------------------------------------------


def test_export_hf_loads_in_transformers_and_imports_back(model, framework_ckpt, tmp_path):
    hf_dir = tmp_path / "hf"
    assert ckpt(["export-hf", framework_ckpt, hf_dir, "--max-shard-size", "1MB"]) == 0
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"
    assert sorted(p.name for p in hf_dir.glob("*.safetensors")) == shards
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in model.parameters())
    assert_logits_match(model, hf_dir)

    back = tmp_path / "back"
    assert ckpt(["import-hf", hf_dir, back]) == 0
    assert resolve_checkpoint(back) == back  # committed: what checkpoint.init_from accepts
    restored = load_tensors(back)
    original = model.state_dict()
    assert restored.keys() == {f"model.{k}" for k in original}
    assert all(torch.equal(restored[f"model.{k}"], v) for k, v in original.items())
    assert read_meta(back)["model_config"]["hidden_size"] == model.config.hidden_size


def test_python_m_entry_point(framework_ckpt):
    result = subprocess.run([sys.executable, "-m", "checkpoints_tools", "inspect", str(framework_ckpt)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "parameters" in result.stdout and "imported from  format test" in result.stdout


def test_imported_checkpoint_seeds_the_trainer(model, framework_ckpt, tmp_path):
    """The trainer's CheckpointManager takes an import as init_from with init_load=model."""
    from fms_bamba.checkpoint import CheckpointConfig, CheckpointManager

    class State:
        def __init__(self):
            self.state = {}

        def state_dict(self):
            return self.state

        def load_state_dict(self, state):
            self.state = state

    hf_dir, imported = tmp_path / "hf", tmp_path / "imported"
    assert ckpt(["export-hf", framework_ckpt, hf_dir, "--dtype", "bf16"]) == 0
    assert ckpt(["import-hf", hf_dir, imported]) == 0  # bf16 on disk -> float32 checkpoint
    fresh = random_model(model.config, seed=1)
    optimizer = torch.optim.AdamW(fresh.parameters())
    manager = CheckpointManager(
        CheckpointConfig(init_from=str(imported), init_load="model"), tmp_path / "run", model=fresh,
        optimizer=optimizer, lr_scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
        data_loader=State(), trainer_state=State(),
    )
    assert manager.load()
    for name, value in fresh.state_dict().items():
        assert value.dtype == torch.float32
        assert torch.equal(value, model.state_dict()[name].to(torch.bfloat16).float()), name


# --------------------------------------------------------------------------------------------
# the original trainer's layout -> framework -> transformers
# --------------------------------------------------------------------------------------------


def mamba_ssm_config(config: BambaConfig) -> dict:
    """A mamba-ssm MambaConfig config.json, as fms-fsdp wrote Bamba-9B's, at `config`'s size."""
    return {
        "d_model": config.hidden_size, "d_intermediate": config.mlp_hidden_size, "n_layer": config.n_layers,
        "vocab_size": config.vocab_size,
        "ssm_cfg": {"layer": "Mamba2", "d_state": config.mamba_d_state, "headdim": config.mamba_head_dim,
                    "chunk_size": config.mamba_chunk_size},
        "attn_layer_idx": list(config.attn_layer_indices),
        "attn_cfg": {"causal": True, "d_conv": 0, "head_dim": config.head_dim, "num_heads": config.n_heads,
                     "num_heads_kv": config.n_kv_heads, "out_proj_bias": False, "qkv_proj_bias": False,
                     "rotary_emb_dim": config.head_dim // 2},
        "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 16,
        "tie_embeddings": False,
    }


def to_mamba_ssm(model: Bamba) -> dict[str, torch.Tensor]:
    """Our weights packed the way mamba-ssm's MambaLMHeadModel holds them, written out by hand."""
    s, cfg = model.state_dict(), model.config
    out = {"backbone.embedding.weight": s["tok_embeddings.weight"], "backbone.norm_f.weight": s["norm.weight"],
           "lm_head.weight": s["output.weight"]}
    for i in range(cfg.n_layers):
        ours, theirs = f"layers.{i}.", f"backbone.layers.{i}."
        out[theirs + "norm.weight"] = s[ours + "mixer_norm.weight"]
        out[theirs + "norm2.weight"] = s[ours + "mlp_norm.weight"]
        out[theirs + "mlp.fc1.weight"] = torch.cat([s[ours + "mlp.up_proj.weight"], s[ours + "mlp.gate_proj.weight"]])
        out[theirs + "mlp.fc2.weight"] = s[ours + "mlp.down_proj.weight"]
        if cfg.is_attention_layer(i):
            out[theirs + "mixer.in_proj.weight"] = torch.cat(
                [s[ours + f"mixer.{p}_proj.weight"] for p in ("q", "k", "v")])
            out[theirs + "mixer.out_proj.weight"] = s[ours + "mixer.o_proj.weight"]
        else:
            for name in ("in_proj.weight", "dt_bias", "A_log", "D", "norm.weight", "out_proj.weight"):
                out[theirs + f"mixer.{name}"] = s[ours + f"mixer.{name}"]
            out[theirs + "mixer.conv1d.weight"] = s[ours + "mixer.conv_weight"].unsqueeze(1)
            out[theirs + "mixer.conv1d.bias"] = s[ours + "mixer.conv_bias"]
    return {k: v.clone() for k, v in out.items()}


def test_hand_packing_follows_mamba_ssm_forward(model):
    """The packing above computes what mamba-ssm's GatedMLP and MHA compute from it."""
    packed, block = to_mamba_ssm(model), model.layers[2]
    x = torch.randn(3, model.config.hidden_size)
    with torch.no_grad():
        y, gate = F.linear(x, packed["backbone.layers.2.mlp.fc1.weight"]).chunk(2, dim=-1)
        assert torch.allclose(F.linear(y * F.silu(gate), packed["backbone.layers.2.mlp.fc2.weight"]), block.mlp(x))
        head_dim, n_heads, n_kv = model.config.head_dim, model.config.n_heads, model.config.n_kv_heads
        q, kv = F.linear(x, packed["backbone.layers.2.mixer.in_proj.weight"]).split(
            [n_heads * head_dim, 2 * n_kv * head_dim], dim=-1)
        k, v = kv.unflatten(-1, (2, n_kv, head_dim)).unbind(-3)
        assert torch.allclose(q, block.mixer.q_proj(x))
        assert torch.allclose(k.flatten(-2), block.mixer.k_proj(x))
        assert torch.allclose(v.flatten(-2), block.mixer.v_proj(x))


def test_original_config_maps_to_ours(model):
    # mamba-ssm records no maximum length: imports take BambaConfig's default
    expected = dataclasses.replace(model.config, max_seq_len=BambaConfig.max_seq_len)
    assert config_from_original(mamba_ssm_config(model.config), "config.json") == expected
    bamba_9b = mamba_ssm_config(BambaConfig.from_preset("bamba-9b"))
    bamba_9b["ssm_cfg"] = {"layer": "Mamba2"}  # fms-fsdp's mamba_9.8b relies on Mamba2's defaults
    del bamba_9b["attn_cfg"]["head_dim"]
    expected = dataclasses.replace(BambaConfig.from_preset("bamba-9b"), bos_token_id=None, eos_token_id=None)
    assert config_from_original(bamba_9b, "config.json") == expected


@pytest.fixture(scope="module")
def original_file(model, tmp_path_factory) -> Path:
    """fms-fsdp's single-file layout: {"model_state": ..., "step": ...} beside mamba-ssm's config.json."""
    folder = tmp_path_factory.mktemp("original")
    torch.save({"model_state": to_mamba_ssm(model), "step": 1234}, folder / "consolidated.00.pth")
    (folder / "config.json").write_text(json.dumps(mamba_ssm_config(model.config)))
    return folder / "consolidated.00.pth"


def test_original_file_to_framework_to_hf(model, original_file, tmp_path):
    out, hf_dir = tmp_path / "imported", tmp_path / "hf"
    assert ckpt(["import-original", original_file, out]) == 0
    assert read_meta(out)["source"]["step"] == 1234
    restored = load_tensors(out)
    assert all(torch.equal(restored[f"model.{k}"], v) for k, v in model.state_dict().items())
    assert ckpt(["export-hf", out, hf_dir]) == 0
    assert_logits_match(model, hf_dir)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_original_dcp_directory(model, original_file, tmp_path):
    """fms-fsdp's sharded layout: DCP keys "model_state.<name>" beside "optimizer_state.…"."""
    src = tmp_path / "step_1234_ckp"
    state = {"model_state": to_mamba_ssm(model), "optimizer_state": {"state": {"0": {"exp_avg": torch.ones(3)}}}}
    dcp.save(state, checkpoint_id=src, no_dist=True)
    out = tmp_path / "imported"
    assert ckpt(["import-original", src, out, "--config", original_file.parent / "config.json", "--dtype", "bf16"]) == 0
    restored = load_tensors(out)
    assert all(torch.equal(restored[f"model.{k}"], v.to(torch.bfloat16)) for k, v in model.state_dict().items())


def test_original_torch_file_formats(model, original_file, tmp_path, capsys):
    """torch's legacy (non-zip) format, which cannot be memory-mapped, imports; a damaged file is named."""
    legacy, out = tmp_path / "consolidated.00.pth", tmp_path / "imported"
    torch.save({"model_state": to_mamba_ssm(model)}, legacy, _use_new_zipfile_serialization=False)
    assert ckpt(["import-original", legacy, out, "--config", original_file.parent / "config.json"]) == 0
    restored = load_tensors(out)
    assert all(torch.equal(restored[f"model.{k}"], v) for k, v in model.state_dict().items())
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(original_file.read_bytes()[:1000])
    assert f"{truncated}: not a readable torch file" in error_of(
        ["import-original", truncated, tmp_path / "o", "--config", "tiny"], capsys)


# --------------------------------------------------------------------------------------------
# a checkpoint of a 2-process training run
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> Path:
    """`fms-bamba train` of the tiny model under torchrun, 2 processes (FSDP2 shards), 4 steps."""
    root = tmp_path_factory.mktemp("run")
    rng = np.random.default_rng(0)
    schema = pa.schema([("tokens", pa.uint32())])
    (root / "data" / "a").mkdir(parents=True)
    with pa.OSFile(str(root / "data" / "a" / "part-0.arrow"), "wb") as sink, ipc.new_file(sink, schema) as writer:
        for _ in range(100):
            writer.write_batch(pa.record_batch([pa.array(rng.integers(2, 4096, 50).astype(np.uint32))], schema=schema))
    tokenizer = {"version": "1.0", "model": {"type": "WordLevel", "vocab": {"<unk>": 0}, "unk_token": "<unk>"}}
    (root / "tokenizer.json").write_text(json.dumps(tokenizer))
    run_dir = root / "run"
    options = {
        "job.run_dir": run_dir, "data.root": root / "data", "data.datasets": "[a]", "data.num_workers": 0,
        "data.bos_token_id": 0, "data.eos_token_id": 1, "model.tokenizer": root / "tokenizer.json",
        "training.device": "cpu", "training.seq_len": 64, "training.micro_batch_size": 2, "training.steps": 4,
        "lr_scheduler.warmup_steps": 1, "checkpoint.interval": 2, "metrics.log_interval": 2,
        "metrics.progress_bar": False,
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), "-m", "fms_bamba.cli", "train",
               str(REPO / "configs" / "tiny.yaml"), *(f"--{k}={v}" for k, v in options.items())]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_two_process_checkpoint_consolidates_on_one_process(two_process_run, tmp_path):
    latest = resolve_checkpoint(two_process_run)
    assert latest.name == "step-00000004" and len(list(latest.glob("*.distcp"))) == 2
    meta = read_meta(latest)
    config = BambaConfig.from_preset("tiny", max_seq_len=64)

    out = tmp_path / "model.safetensors"
    assert ckpt(["consolidate", two_process_run, out]) == 0
    state = load_file(out)
    model = Bamba(config)
    model.load_state_dict(state, strict=True)
    stored = load_tensors(latest)
    assert all(torch.equal(state[k], stored[f"model.{k}"]) for k in model.state_dict())

    with_optimizer = tmp_path / "full.pt"
    assert ckpt(["consolidate", latest, with_optimizer, "--optimizer", "--dtype", "bf16"]) == 0
    full = torch.load(with_optimizer, weights_only=True)
    exp_avg = full["optimizer.state.layers.0.mixer.in_proj.weight.exp_avg"]
    assert exp_avg.dtype == torch.bfloat16 and exp_avg.shape == model.layers[0].mixer.in_proj.weight.shape
    assert full["model.output.weight"].dtype == torch.bfloat16

    hf_dir = tmp_path / "hf"  # the run's tokenizer/ comes along by default
    assert ckpt(["export-hf", two_process_run, hf_dir]) == 0
    assert (hf_dir / "tokenizer.json").read_bytes() == (two_process_run / "tokenizer" / "tokenizer.json").read_bytes()
    assert json.loads((hf_dir / "config.json").read_text())["max_position_embeddings"] == 64
    assert_logits_match(model.eval(), hf_dir)
    assert meta["world_size"] == 2


@pytest.mark.slow
def test_inspect_reports_the_run(two_process_run, capsys):
    assert ckpt(["inspect", two_process_run]) == 0
    text = capsys.readouterr().out
    assert "step-00000002" in text and "step-00000004" in text and "status        complete" in text
    assert "tokens seen   1,024" in text and "2 rank(s)" in text and "a: weight 1" in text
    assert ckpt(["inspect", two_process_run, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)["checkpoint"]
    assert info["complete"] and info["step"] == 4 and info["tokens_seen"] == 4 * 2 * 2 * 64
    assert info["parameters"] == sum(p.numel() for p in Bamba(BambaConfig.from_preset("tiny")).parameters())
    assert info["tensors"]["optimizer"]["count"] > 0 and info["data"]["a"]["tokens"] > 0


@pytest.mark.slow
def test_inspect_says_a_checkpoint_is_incomplete(two_process_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(two_process_run, run)
    broken = run / "checkpoints" / "step-00000004"
    shard = next(broken.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])  # a write cut short
    assert ckpt(["inspect", broken]) == 1
    text = capsys.readouterr().out
    assert f"INCOMPLETE: {shard}: 100 bytes" in text and "step          4" in text
    assert ckpt(["inspect", run]) == 0  # the run still has a complete checkpoint, step 2
    assert "status        complete" in capsys.readouterr().out
    assert ckpt(["consolidate", broken, tmp_path / "m.safetensors"]) == 2
    assert "incomplete checkpoint" in capsys.readouterr().err
    unfinished = run / "checkpoints" / "step-00000006.tmp"
    shutil.copytree(run / "checkpoints" / "step-00000002", unfinished)
    (unfinished / "meta.json").unlink()
    assert ckpt(["inspect", unfinished]) == 1
    assert "INCOMPLETE: never committed (still named .tmp)" in capsys.readouterr().out
    shutil.rmtree(unfinished)
    (run / "checkpoints" / "step-00000002" / "meta.json").unlink()  # as if killed before the commit
    assert ckpt(["inspect", run]) == 1
    assert "no meta.json" in capsys.readouterr().out
    assert all(not c.complete for c in list_checkpoints(run))


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------


def error_of(args: list, capsys) -> str:
    assert ckpt(args) == 2
    return capsys.readouterr().err


def test_not_a_checkpoint(framework_ckpt, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "a file" in error_of(["inspect", framework_ckpt / "meta.json"], capsys)
    assert "holds no optimizer state" in error_of(
        ["consolidate", framework_ckpt, tmp_path / "m.pt", "--optimizer"], capsys)
    assert "holds no complete checkpoint" in error_of(["consolidate", tmp_path / "empty", tmp_path / "m.pt"], capsys)
    assert "not a checkpoint" in error_of(["inspect", tmp_path / "empty"], capsys)
    assert "no such" in error_of(["export-hf", tmp_path / "missing", tmp_path / "hf"], capsys)
    assert "not a transformers model folder" in error_of(["import-hf", tmp_path / "empty", tmp_path / "o"], capsys)
    assert "not a mamba-ssm checkpoint" in error_of(
        ["import-original", tmp_path / "empty", tmp_path / "o", "--config", "tiny"], capsys)
    assert "*.safetensors" in error_of(["consolidate", tmp_path / "empty", tmp_path / "m.npz"], capsys)
    assert "--dtype" in error_of(["import-hf", tmp_path / "empty", tmp_path / "o", "--dtype", "int7"], capsys)


def test_tensors_that_do_not_match_the_config(model, framework_ckpt, tmp_path, capsys):
    hf_dir = tmp_path / "hf"
    assert ckpt(["export-hf", framework_ckpt, hf_dir, "--max-shard-size", "100GB"]) == 0
    shard = hf_dir / "model-00001-of-00001.safetensors"
    tensors = load_file(shard)
    del tensors["model.layers.1.mamba.D"]
    tensors["model.layers.0.mamba.A_log"] = torch.zeros(7)
    save_file(tensors, shard, metadata={"format": "pt"})
    message = error_of(["import-hf", hf_dir, tmp_path / "o"], capsys)
    assert "missing 1 tensor(s): model.layers.1.mamba.D" in message
    assert "model.layers.0.mamba.A_log (7,) (expected (4,))" in message

    packed = to_mamba_ssm(model)
    packed["backbone.layers.0.mlp.fc1.weight"] = packed["backbone.layers.0.mlp.fc1.weight"][:-2]
    torch.save(packed, tmp_path / "bad.pth")
    (tmp_path / "config.json").write_text(json.dumps(mamba_ssm_config(model.config)))
    assert "backbone.layers.0.mlp.fc1.weight (510, 64) (expected (512, 64))" in error_of(
        ["import-original", tmp_path / "bad.pth", tmp_path / "o"], capsys)

    meta = read_meta(framework_ckpt)  # a checkpoint whose recorded config is not its tensors'
    mismatched = tmp_path / "mismatched"
    shutil.copytree(framework_ckpt, mismatched)
    meta["model_config"]["n_layers"] = 5
    (mismatched / "meta.json").write_text(json.dumps(meta))
    assert "missing 13 tensor(s): layers.4." in error_of(["consolidate", mismatched, tmp_path / "m.pt"], capsys)

    unsupported = mamba_ssm_config(model.config) | {"tie_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(unsupported))
    assert "tie_embeddings=True is not supported" in error_of(
        ["import-original", tmp_path / "bad.pth", tmp_path / "o"], capsys)


def test_existing_output_is_refused_unless_overwrite(framework_ckpt, tmp_path, capsys):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "keep.txt").write_text("mine")
    assert "already exists; pass --overwrite" in error_of(["export-hf", framework_ckpt, hf_dir], capsys)
    assert (hf_dir / "keep.txt").read_text() == "mine"
    assert ckpt(["export-hf", framework_ckpt, hf_dir, "--overwrite"]) == 0
    assert not (hf_dir / "keep.txt").exists() and (hf_dir / "config.json").is_file()
    assert not list(tmp_path.glob("*.partial"))
    out = tmp_path / "ckpt"
    assert ckpt(["import-hf", hf_dir, out]) == 0
    assert "already exists" in error_of(["import-hf", hf_dir, out], capsys)
    assert ckpt(["import-hf", hf_dir, out, "--overwrite"]) == 0
    assert resolve_checkpoint(out) == out


class Payload:
    """Unpickling this would run code: it must never be unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_files_that_need_arbitrary_unpickling_are_refused(model, original_file, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    torch.save({"model_state": to_mamba_ssm(model), "extra": Payload(marker)}, tmp_path / "consolidated.00.pth")
    shutil.copy(original_file.parent / "config.json", tmp_path / "config.json")
    assert "refusing to load" in error_of(["import-original", tmp_path / "consolidated.00.pth", tmp_path / "o"], capsys)

    src = tmp_path / "dcp"
    dcp.save({"model_state": to_mamba_ssm(model)}, checkpoint_id=src, no_dist=True)
    (src / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    assert "refusing to unpickle" in error_of(["import-original", src, tmp_path / "o", "--config", "tiny"], capsys)
    assert not marker.exists() and not (tmp_path / "o").exists()
