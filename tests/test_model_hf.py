"""Bamba against transformers' BambaForCausalLM, and the weight/config mapping to its format."""

import json

import pytest
import torch

from fms_bamba.model import Bamba, BambaConfig
from fms_bamba.model.hf_mapping import (
    config_from_hf,
    config_to_hf,
    from_hf_state_dict,
    hf_names,
    to_hf_state_dict,
)

transformers = pytest.importorskip("transformers")


def tiny_config(**overrides) -> BambaConfig:
    # both block kinds; chunk 16 does not divide the test length 45
    return BambaConfig.from_preset("tiny", **{"mamba_chunk_size": 16, **overrides})


def hf_model(config: BambaConfig):
    return transformers.BambaForCausalLM(transformers.BambaConfig(**config_to_hf(config))).eval()


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    ours = Bamba(tiny_config()).eval()
    theirs = hf_model(ours.config)
    theirs.load_state_dict(to_hf_state_dict(ours.state_dict(), ours.config), strict=True)
    return ours, theirs


def test_logits_match_transformers_float32(models):
    ours, theirs = models
    assert {"linear_attention", "full_attention"} <= set(theirs.config.layers_block_type)
    ids = torch.randint(0, ours.config.vocab_size, (2, 45))
    with torch.no_grad():
        diff = (ours(ids) - theirs(ids).logits).abs().max().item()
    assert diff <= 1e-4


def test_mapping_is_one_to_one(models):
    ours, theirs = models
    names = hf_names(ours.config)
    assert set(names) == set(ours.state_dict())
    assert set(names.values()) == set(theirs.state_dict())
    assert len(set(names.values())) == len(names)
    state = ours.state_dict()
    back = from_hf_state_dict(to_hf_state_dict(state, ours.config), ours.config)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    hf_state = theirs.state_dict()
    hf_back = to_hf_state_dict(from_hf_state_dict(hf_state, ours.config), ours.config)
    assert all(hf_back[k].shape == hf_state[k].shape for k in hf_state)


def test_mapping_rejects_foreign_keys(models):
    ours, _ = models
    state = dict(ours.state_dict())
    state["layers.0.mixer.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected \['layers.0.mixer.extra'\]"):
        to_hf_state_dict(state, ours.config)
    with pytest.raises(ValueError, match="missing"):
        from_hf_state_dict({"lm_head.weight": torch.zeros(1)}, ours.config)


def test_config_round_trip():
    for name in ("bamba-9b", "bamba-1b", "tiny"):
        config = BambaConfig.from_preset(name)
        hf = json.loads(json.dumps(config_to_hf(config)))
        assert config_from_hf(hf) == config
        assert transformers.BambaConfig(**hf).mamba_d_head == config.mamba_head_dim
    assert config_from_hf(config_to_hf(tiny_config()), doc_masking=True).doc_masking


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "llama"}, "model_type"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"mamba_d_head": 7}, "mamba_n_heads \\* mamba_head_dim"),
        ({"attn_rotary_emb": 32}, "attn_rotary_emb"),
    ],
)
def test_config_from_hf_rejects_what_it_cannot_load(change, message):
    hf = {**config_to_hf(tiny_config()), **change}
    with pytest.raises(ValueError, match=message):
        config_from_hf(hf)
    hf = config_to_hf(tiny_config())
    del hf["hidden_size"]
    with pytest.raises(ValueError, match="'hidden_size' is missing"):
        config_from_hf(hf)


@pytest.mark.parametrize("shard", [False, True])
def test_from_hf_loads_a_save_pretrained_folder(models, tmp_path, shard):
    ours, theirs = models
    theirs.save_pretrained(tmp_path, **({"max_shard_size": "300KB"} if shard else {}))
    assert (tmp_path / "model.safetensors.index.json").is_file() == shard
    loaded = Bamba.from_hf(tmp_path)
    assert loaded.config == ours.config
    ids = torch.randint(0, ours.config.vocab_size, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), theirs(ids).logits, rtol=1e-4, atol=1e-4)
    overridden = Bamba.from_hf(tmp_path, dtype=torch.bfloat16, doc_masking=True)
    assert overridden.config.doc_masking and overridden.output.weight.dtype == torch.bfloat16


def test_from_hf_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Bamba.from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(tiny_config())))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Bamba.from_hf(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=f"{tmp_path / 'model.safetensors'}: not a readable safetensors file"):
        Bamba.from_hf(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match="model.safetensors.index.json: not a safetensors index"):
        Bamba.from_hf(tmp_path)


def test_config_from_hf_reads_transformers_4x_style_bamba_9b():
    # fields as transformers 4.x wrote them: rope_theta at the top, no rope_parameters
    legacy = {
        "architectures": ["BambaForCausalLM"], "model_type": "bamba", "attention_bias": False,
        "attn_layer_indices": [9, 18, 27], "attn_rotary_emb": 64, "bos_token_id": 128000,
        "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336,
        "mamba_chunk_size": 256, "mamba_conv_bias": True, "mamba_d_conv": 4, "mamba_d_head": 64,
        "mamba_d_state": 128, "mamba_expand": 2, "mamba_n_groups": 1, "mamba_n_heads": 128,
        "mamba_proj_bias": False, "max_position_embeddings": 262144, "num_attention_heads": 32,
        "num_hidden_layers": 32, "num_key_value_heads": 8, "pad_token_id": 0, "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "use_mamba_kernels": True, "vocab_size": 128256,
    }
    assert config_from_hf(legacy) == BambaConfig.from_preset("bamba-9b", max_seq_len=262144)
