"""`import-original`: checkpoints of the trainer that produced Bamba (fms-fsdp training mamba-ssm's
`MambaLMHeadModel`), as a single torch file (`consolidated.00.pth`, `pytorch_model.bin`, fms-fsdp's
`step_N_ckp.pth`) or as a torch.distributed.checkpoint directory (fms-fsdp's `step_N_ckp/`).

The table below is the one place that knows mamba-ssm's weight names and fused layouts.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import zipfile
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import torch

from checkpoints_tools.common import cast, check_output, check_shapes, model_shapes, write_model_checkpoint
from fms_bamba.checkpoint import DCP_METADATA_FILE, iter_tensors, list_tensors
from fms_bamba.model import PRESETS, BambaConfig

logger = logging.getLogger(__name__)

# mamba-ssm name -> the framework tensors it holds, stacked along dim 0 in this order.
_TOP_LEVEL = {
    "backbone.embedding.weight": ("tok_embeddings.weight",),
    "backbone.norm_f.weight": ("norm.weight",),
    "lm_head.weight": ("output.weight",),
}
_EVERY_BLOCK = {  # under backbone.layers.N.
    "norm.weight": ("mixer_norm.weight",),
    "norm2.weight": ("mlp_norm.weight",),
    # GatedMLP: y, gate = fc1(x).chunk(2); fc2(y * silu(gate))
    "mlp.fc1.weight": ("mlp.up_proj.weight", "mlp.gate_proj.weight"),
    "mlp.fc2.weight": ("mlp.down_proj.weight",),
}
_MAMBA_BLOCK = {
    "mixer.in_proj.weight": ("mixer.in_proj.weight",),  # the same [z, xBC, dt] rows
    "mixer.conv1d.weight": ("mixer.conv_weight",),  # an nn.Conv1d's [C, 1, K]; ours [C, K]
    "mixer.conv1d.bias": ("mixer.conv_bias",),
    "mixer.dt_bias": ("mixer.dt_bias",),
    "mixer.A_log": ("mixer.A_log",),
    "mixer.D": ("mixer.D",),
    "mixer.norm.weight": ("mixer.norm.weight",),
    "mixer.out_proj.weight": ("mixer.out_proj.weight",),
}
_ATTENTION_BLOCK = {
    # MHA: q, kv = in_proj(x).split([heads * d, 2 * kv_heads * d]), kv laid out (two, kv_heads, d)
    "mixer.in_proj.weight": ("mixer.q_proj.weight", "mixer.k_proj.weight", "mixer.v_proj.weight"),
    "mixer.out_proj.weight": ("mixer.o_proj.weight",),
}
_CONV_WEIGHT = "mixer.conv1d.weight"
# fms-fsdp saves the model under this key (DCP: a key prefix) next to "optimizer_state".
MODEL_KEY = "model_state"
# Module wrappers (FSDP1, torch.compile, activation checkpointing) that can leave their names in keys.
_WRAPPER_SEGMENTS = ("_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
SINGLE_FILES = ("consolidated.00.pth", "pytorch_model.bin")


def original_names(config: BambaConfig) -> dict[str, tuple[str, ...]]:
    """mamba-ssm name -> framework names stacked in it, for every tensor of the model."""
    names = dict(_TOP_LEVEL)
    for i in range(config.n_layers):
        block = _ATTENTION_BLOCK if config.is_attention_layer(i) else _MAMBA_BLOCK
        for theirs, ours in {**_EVERY_BLOCK, **block}.items():
            names[f"backbone.layers.{i}.{theirs}"] = tuple(f"layers.{i}.{name}" for name in ours)
    return names


def original_shapes(config: BambaConfig) -> dict[str, torch.Size]:
    """The shape mamba-ssm gives each tensor: its pieces' rows stacked."""
    shapes = model_shapes(config)
    result = {}
    for theirs, ours in original_names(config).items():
        rows, rest = sum(shapes[name][0] for name in ours), shapes[ours[0]][1:]
        result[theirs] = torch.Size([rows, 1, *rest] if theirs.endswith(_CONV_WEIGHT) else [rows, *rest])
    return result


def config_from_original(cfg: dict, source: str) -> BambaConfig:
    """A BambaConfig from mamba-ssm's config.json (MambaConfig: d_model, ssm_cfg, attn_cfg, ...),
    refusing what Bamba's model does not have. Defaults are mamba-ssm's."""
    ssm, attn = cfg.get("ssm_cfg") or {}, cfg.get("attn_cfg") or {}

    def require(ok: bool, field: str, value, wanted: str) -> None:
        if not ok:
            raise ValueError(f"{source}: {field}={value!r} is not supported (Bamba needs {wanted})")

    for name in ("d_model", "n_layer", "vocab_size", "d_intermediate"):
        if not isinstance(cfg.get(name), int):
            raise ValueError(f"{source}: field {name!r} is missing or not an integer")
    require(ssm.get("layer") == "Mamba2", "ssm_cfg.layer", ssm.get("layer"), "Mamba2")
    require(cfg["d_intermediate"] > 0, "d_intermediate", cfg["d_intermediate"], "an MLP in every block")
    require(cfg.get("rms_norm", True), "rms_norm", cfg.get("rms_norm"), "RMSNorm")
    require(cfg.get("tie_embeddings", True) is False, "tie_embeddings", cfg.get("tie_embeddings", True), "False")
    require(cfg.get("norm_epsilon", 1e-5) == 1e-5, "norm_epsilon", cfg.get("norm_epsilon"), "1e-5, the gated norm's")
    mamba_defaults = {"bias": False, "conv_bias": True, "rmsnorm": True, "norm_before_gate": False,
                      "D_has_hdim": False, "d_ssm": None}
    for name, wanted in mamba_defaults.items():
        require(ssm.get(name, wanted) == wanted, f"ssm_cfg.{name}", ssm.get(name), repr(wanted))
    require("dt_limit" not in ssm, "ssm_cfg.dt_limit", ssm.get("dt_limit"), "no dt limit")

    d_model, layers = cfg["d_model"], tuple(cfg.get("attn_layer_idx") or ())
    fields: dict = {}
    if layers:
        n_heads = attn.get("num_heads")
        if not isinstance(n_heads, int):
            raise ValueError(f"{source}: attn_cfg.num_heads is missing")
        head_dim = d_model // n_heads
        # MHA setting: (mamba-ssm's default, Bamba's attention)
        attention = {"causal": (False, True), "qkv_proj_bias": (True, False), "out_proj_bias": (True, False),
                     "d_conv": (0, 0), "rotary_emb_interleaved": (False, False), "mlp_dim": (0, 0),
                     "rotary_emb_dim": (0, head_dim // 2)}
        for name, (default, wanted) in attention.items():
            value = attn.get(name, default)
            require(value == wanted, f"attn_cfg.{name}", value, repr(wanted))
        require(attn.get("head_dim") in (None, head_dim), "attn_cfg.head_dim", attn.get("head_dim"),
                f"d_model // num_heads = {head_dim}")
        fields.update(n_heads=n_heads, n_kv_heads=attn.get("num_heads_kv") or n_heads,
                      rope_theta=float(attn.get("rotary_emb_base", 10000.0)))
    # MambaLMHeadModel pads the vocabulary, GatedMLP rounds its width up to a multiple of 128.
    pad = cfg.get("pad_vocab_size_multiple", 8)
    expand, head_dim = ssm.get("expand", 2), ssm.get("headdim", 64)
    try:
        return BambaConfig(
            vocab_size=math.ceil(cfg["vocab_size"] / pad) * pad,
            hidden_size=d_model,
            n_layers=cfg["n_layer"],
            attn_layer_indices=layers,
            mlp_hidden_size=math.ceil(cfg["d_intermediate"] / 128) * 128,
            mamba_expand=expand,
            mamba_n_heads=expand * d_model // head_dim,
            mamba_head_dim=head_dim,
            mamba_d_state=ssm.get("d_state", 128),
            mamba_n_groups=ssm.get("ngroups", 1),
            mamba_conv_kernel=ssm.get("d_conv", 4),
            mamba_chunk_size=ssm.get("chunk_size", 256),
            **fields,
        )
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None


def resolve_config(src: Path, config: str | os.PathLike | None) -> BambaConfig:
    """--config (a preset name or a mamba-ssm config.json), else the config.json beside SRC."""
    if config is None:
        folder = src if src.is_dir() else src.parent
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{src}: no config.json beside the checkpoint; pass --config with a "
                                    f"mamba-ssm config.json or a preset ({', '.join(sorted(PRESETS))})")
        config = folder / "config.json"
    if str(config) in PRESETS:
        return BambaConfig.from_preset(str(config))
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"--config: {path} is neither a file nor a preset ({', '.join(sorted(PRESETS))})")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return config_from_original(cfg, str(path))


def _clean(name: str) -> str:
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


def safe_torch_load(path: Path) -> object:
    """torch.load with weights_only (plain containers and tensors only); memory-mapped when the
    file is torch's zip format, which mmap needs (torch < 1.6 and `_use_new_zipfile_serialization=
    False` wrote the legacy format, read whole)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path}: refusing to load: it needs unpickling arbitrary objects, and only "
                         f"weights-only files are read ({str(err).splitlines()[0]})") from None
    except RuntimeError as err:  # a damaged zip archive; torch's message does not name the file
        raise ValueError(f"{path}: not a readable torch file ({str(err).splitlines()[0]})") from None


class OriginalSource(NamedTuple):
    shapes: dict[str, torch.Size]
    """mamba-ssm name -> shape of every model tensor found."""
    tensors: Callable[[], Iterator[tuple[str, torch.Tensor]]]
    """Yields (mamba-ssm name, tensor), one tensor read at a time where the format allows."""
    info: dict
    """What is known of the source (path, format, step)."""


def _open_file(path: Path) -> OriginalSource:
    loaded = safe_torch_load(path)
    if isinstance(loaded, dict) and isinstance(loaded.get(MODEL_KEY), dict):
        state = loaded[MODEL_KEY]
    elif isinstance(loaded, dict) and loaded and all(isinstance(v, torch.Tensor) for v in loaded.values()):
        state = loaded
    else:
        keys = list(loaded)[:8] if isinstance(loaded, dict) else type(loaded).__name__
        raise ValueError(f"{path}: holds no model state dict (a '{MODEL_KEY}' entry or a dict of tensors): {keys}")
    state = {_clean(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    info = {"format": "mamba-ssm file", "path": str(path)}
    if isinstance(loaded.get("step"), int):
        info["step"] = loaded["step"]
    return OriginalSource({k: v.shape for k, v in state.items()}, lambda: iter(state.items()), info)


def _open_dcp(path: Path) -> OriginalSource:
    saved = list_tensors(path, prefix="")  # the metadata pickle is read with only DCP's types allowed
    prefix = f"{MODEL_KEY}." if any(k.startswith(f"{MODEL_KEY}.") for k in saved) else ""
    keys = [k for k in saved if k.startswith(prefix) and not k.startswith("optimizer_state.")]
    names = {key: _clean(key.removeprefix(prefix)) for key in keys}
    info = {"format": "mamba-ssm DCP", "path": str(path)}
    metadata_file = path / "metadata.pth"  # fms-fsdp's counters, torch.save'd by rank 0
    if metadata_file.is_file():
        try:
            counters = safe_torch_load(metadata_file)
            info.update({key: counters[key] for key in ("step", "tokens_seen") if isinstance(counters.get(key), int)})
        except (ValueError, AttributeError, RuntimeError) as err:
            logger.warning("ignoring %s: %s", metadata_file, err)
    return OriginalSource({names[k]: saved[k][0] for k in keys},
                          lambda: ((names[k], t) for k, t in iter_tensors(path, keys=keys)), info)


def open_original(src: Path) -> OriginalSource:
    """A single torch file, a DCP directory, or a folder holding one of SINGLE_FILES."""
    if src.is_file():
        return _open_file(src)
    if (src / DCP_METADATA_FILE).is_file():
        return _open_dcp(src)
    for name in SINGLE_FILES:
        if (src / name).is_file():
            return _open_file(src / name)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or directory")
    raise ValueError(f"{src}: not a mamba-ssm checkpoint: expected a torch file, a DCP directory "
                     f"(with {DCP_METADATA_FILE}) or a folder with one of {', '.join(SINGLE_FILES)}")


def import_original(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    config: str | os.PathLike | None = None,
    dtype: torch.dtype | None = torch.float32,
    overwrite: bool = False,
) -> Path:
    """Write the model of an original-trainer checkpoint as a committed checkpoint for continued
    training (`checkpoint.init_from=OUT`, `init_load=model`); fused tensors are split."""
    src, out = Path(src), Path(out)
    check_output(out, overwrite)
    model_config = resolve_config(src, config)
    source = open_original(src)
    check_shapes(source.shapes, original_shapes(model_config), str(src))
    names, shapes = original_names(model_config), model_shapes(model_config)
    state = {}
    for theirs, tensor in source.tensors():
        ours = names[theirs]
        for name, piece in zip(ours, tensor.split([shapes[name][0] for name in ours])):
            state[name] = cast(piece.reshape(shapes[name]), dtype)
    state = {name: state[name] for name in shapes}  # the model's order
    return write_model_checkpoint(out, state, model_config, source.info)
