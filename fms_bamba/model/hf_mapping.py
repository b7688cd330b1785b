"""The one place that knows transformers' Bamba format: weight names and config.json fields.

Export, import and `Bamba.from_hf` all go through these functions.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from fms_bamba.model.config import BambaConfig

_TOP_LEVEL = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.final_layernorm.weight",
    "output.weight": "lm_head.weight",
}
_EVERY_BLOCK = {
    "mixer_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "pre_ff_layernorm.weight",
    "mlp.gate_proj.weight": "feed_forward.gate_proj.weight",
    "mlp.up_proj.weight": "feed_forward.up_proj.weight",
    "mlp.down_proj.weight": "feed_forward.down_proj.weight",
}
_MAMBA_BLOCK = {
    "mixer.in_proj.weight": "mamba.in_proj.weight",
    "mixer.conv_weight": "mamba.conv1d.weight",  # ours [C, K], theirs an nn.Conv1d's [C, 1, K]
    "mixer.conv_bias": "mamba.conv1d.bias",
    "mixer.dt_bias": "mamba.dt_bias",
    "mixer.A_log": "mamba.A_log",
    "mixer.D": "mamba.D",
    "mixer.norm.weight": "mamba.norm.weight",
    "mixer.out_proj.weight": "mamba.out_proj.weight",
}
_ATTENTION_BLOCK = {
    f"mixer.{proj}.weight": f"self_attn.{proj}.weight" for proj in ("q_proj", "k_proj", "v_proj", "o_proj")
}
_CONV_WEIGHT = "mixer.conv_weight"


def hf_names(config: BambaConfig) -> dict[str, str]:
    """Framework parameter name -> transformers name, for every parameter of Bamba(config)."""
    names = dict(_TOP_LEVEL)
    for i in range(config.n_layers):
        block = _ATTENTION_BLOCK if config.is_attention_layer(i) else _MAMBA_BLOCK
        for ours, theirs in {**_EVERY_BLOCK, **block}.items():
            names[f"layers.{i}.{ours}"] = f"model.layers.{i}.{theirs}"
    return names


def _check_keys(given: set[str], expected: set[str], what: str) -> None:
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        raise ValueError(
            f"{what} does not match the config: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )


def to_hf_state_dict(state_dict: dict[str, torch.Tensor], config: BambaConfig) -> dict[str, torch.Tensor]:
    """A framework state dict (Bamba.state_dict() names) -> transformers' names and shapes."""
    names = hf_names(config)
    _check_keys(set(state_dict), set(names), "framework state dict")
    return {
        names[name]: tensor.unsqueeze(1) if name.endswith(_CONV_WEIGHT) else tensor
        for name, tensor in state_dict.items()
    }


def from_hf_state_dict(state_dict: dict[str, torch.Tensor], config: BambaConfig) -> dict[str, torch.Tensor]:
    """A transformers Bamba state dict -> the framework's names and shapes."""
    ours_by_theirs = {theirs: ours for ours, theirs in hf_names(config).items()}
    _check_keys(set(state_dict), set(ours_by_theirs), "transformers state dict")
    return {
        ours_by_theirs[name]: tensor.squeeze(1) if ours_by_theirs[name].endswith(_CONV_WEIGHT) else tensor
        for name, tensor in state_dict.items()
    }


def config_to_hf(config: BambaConfig) -> dict:
    """A transformers `BambaConfig` config.json dict (model_type "bamba")."""
    return {
        "model_type": "bamba",
        "architectures": ["BambaForCausalLM"],
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": False,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.mlp_hidden_size,
        "num_hidden_layers": config.n_layers,
        "attn_layer_indices": list(config.attn_layer_indices),
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        "max_position_embeddings": config.max_seq_len,
        # transformers >= 5 reads rope_parameters, 4.x reads rope_theta
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta, "partial_rotary_factor": 0.5},
        "rope_theta": config.rope_theta,
        "attn_rotary_emb": config.rope_dim,  # the original Bamba config.json's name for it
        "attention_bias": False,
        "mlp_bias": False,
        "mamba_n_heads": config.mamba_n_heads,
        "mamba_d_head": config.mamba_head_dim,
        "mamba_expand": config.mamba_expand,
        "mamba_d_state": config.mamba_d_state,
        "mamba_n_groups": config.mamba_n_groups,
        "mamba_d_conv": config.mamba_conv_kernel,
        "mamba_chunk_size": config.mamba_chunk_size,
        "mamba_conv_bias": True,
        "mamba_proj_bias": False,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": None,
    }


def config_from_hf(hf_config: dict, **overrides) -> BambaConfig:
    """A transformers Bamba config.json dict -> BambaConfig (fields in `overrides` replace it)."""

    def field(name: str, default=None):
        if name in hf_config and hf_config[name] is not None:
            return hf_config[name]
        if default is None:
            raise ValueError(f"config.json: field {name!r} is missing")
        return default

    if hf_config.get("model_type") != "bamba":
        raise ValueError(f"config.json: model_type is {hf_config.get('model_type')!r}, expected 'bamba'")
    unsupported = {
        "tie_word_embeddings": True, "mamba_proj_bias": True, "attention_bias": True, "mlp_bias": True,
        "mamba_conv_bias": False,
    }
    for name, value in unsupported.items():
        if hf_config.get(name) == value:
            raise ValueError(f"config.json: {name}={value} is not supported (Bamba's is {not value})")
    if field("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act={hf_config['hidden_act']!r} is not supported (only 'silu')")
    rope = hf_config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or rope.get("partial_rotary_factor", 0.5) != 0.5:
        raise ValueError(f"config.json: rope_parameters {rope} unsupported (default RoPE on half the head)")

    hidden, n_heads = field("hidden_size"), field("num_attention_heads")
    if hf_config.get("head_dim") not in (None, hidden // n_heads):
        raise ValueError(f"config.json: head_dim={hf_config['head_dim']} != hidden_size // num_attention_heads")
    if hf_config.get("attn_rotary_emb") not in (None, hidden // n_heads // 2):
        raise ValueError(f"config.json: attn_rotary_emb={hf_config['attn_rotary_emb']} is not half the head dim")
    expand, mamba_heads = field("mamba_expand", 2), field("mamba_n_heads")
    head_dim = field("mamba_d_head", "auto")
    eos = hf_config.get("eos_token_id")
    values = dict(
        vocab_size=field("vocab_size"),
        hidden_size=hidden,
        n_layers=field("num_hidden_layers"),
        attn_layer_indices=tuple(hf_config.get("attn_layer_indices") or ()),
        mlp_hidden_size=field("intermediate_size"),
        norm_eps=field("rms_norm_eps", 1e-5),
        n_heads=n_heads,
        n_kv_heads=field("num_key_value_heads", n_heads),
        rope_theta=float(rope.get("rope_theta", field("rope_theta", 10000.0))),
        mamba_expand=expand,
        mamba_n_heads=mamba_heads,
        mamba_head_dim=expand * hidden // mamba_heads if head_dim == "auto" else head_dim,
        mamba_d_state=field("mamba_d_state"),
        mamba_n_groups=field("mamba_n_groups", 1),
        mamba_conv_kernel=field("mamba_d_conv", 4),
        mamba_chunk_size=field("mamba_chunk_size", 256),
        max_seq_len=field("max_position_embeddings", 4096),
        bos_token_id=hf_config.get("bos_token_id"),
        eos_token_id=eos[0] if isinstance(eos, list) else eos,  # the first when several
    )
    return BambaConfig(**{**values, **overrides})


def read_hf_config(folder: str | Path, **overrides) -> BambaConfig:
    """The BambaConfig of a transformers Bamba folder's config.json; errors name the file."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {folder} is not a transformers model folder")
    try:
        return config_from_hf(json.loads(path.read_text()), **overrides)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    except ValueError as err:
        raise ValueError(f"{folder}: {err}") from None


def load_safetensors_folder(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a transformers folder: model.safetensors, or the shards its index names."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{index}: not a safetensors index, a JSON object with a weight_map ({err!r})") from None
    elif (path / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    state = {}
    for shard in shards:
        try:
            state.update(load_file(path / shard))
        except SafetensorError as err:  # raised with no file name
            raise ValueError(f"{path / shard}: not a readable safetensors file ({err})") from None
    return state
