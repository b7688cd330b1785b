"""`inspect`: what a checkpoint holds, whether it is complete, and how far its run had got."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from fms_bamba.checkpoint import (
    DCP_METADATA_FILE,
    META_FILE,
    list_checkpoints,
    list_tensors,
    read_meta,
    resolve_checkpoint,
)
from fms_bamba.generate import model_config_of


def checkpoint_status(ckpt_dir: Path) -> tuple[bool, str]:
    """(complete, why not) for one checkpoint directory, by the checkpoint module's own rules."""
    for info in list_checkpoints(ckpt_dir.parent):
        if info.path == ckpt_dir:
            return info.complete, info.reason
    if not (ckpt_dir / META_FILE).exists():  # a directory named otherwise, e.g. an import's OUT
        return False, f"{ckpt_dir / META_FILE}: missing; never committed"
    try:
        resolve_checkpoint(ckpt_dir)
    except ValueError as err:
        return False, str(err)
    return True, ""


def describe_checkpoint(ckpt_dir: str | os.PathLike) -> dict:
    """Status, step, tokens, data-loader progress, parameters, dtypes and size of one checkpoint;
    an incomplete one is described as far as its files allow."""
    ckpt_dir = Path(ckpt_dir)
    complete, reason = checkpoint_status(ckpt_dir)
    files = [f for f in ckpt_dir.iterdir() if f.is_file()]
    info: dict = {"path": str(ckpt_dir), "complete": complete, "reason": reason,
                  "size_bytes": sum(f.stat().st_size for f in files), "files": len(files)}
    try:
        meta = read_meta(ckpt_dir)
    except (OSError, ValueError):
        meta = None  # the reason above already says why
    if meta is not None:
        info.update({key: meta.get(key) for key in ("step", "tokens_seen", "world_size", "saved_at", "source")})
        try:
            config = model_config_of(meta, ckpt_dir)
            info["config"] = {"hidden_size": config.hidden_size, "n_layers": config.n_layers,
                              "attn_layer_indices": list(config.attn_layer_indices), "vocab_size": config.vocab_size}
        except ValueError as err:
            info["config"] = {"error": str(err)}
        if "data_loader" in meta:
            from data_loader import describe_progress

            try:
                info["data"] = describe_progress(meta["data_loader"])
            except (KeyError, TypeError, ValueError) as err:
                info["data"] = {"error": f"unreadable data loader state ({err})"}
    if (ckpt_dir / DCP_METADATA_FILE).is_file():
        tensors = list_tensors(ckpt_dir, prefix="")
        info["tensors"] = {}
        for part in ("model", "optimizer"):
            specs = [spec for key, spec in tensors.items() if key.startswith(f"{part}.")]
            info["tensors"][part] = {
                "count": len(specs), "elements": sum(shape.numel() for shape, _ in specs),
                "dtypes": dict(Counter(str(dtype).removeprefix("torch.") for _, dtype in specs)),
            }
        info["parameters"] = info["tensors"]["model"]["elements"]
    return info


def describe(path: str | os.PathLike) -> dict:
    """A checkpoint directory's description, or for a run dir / checkpoints folder every
    checkpoint's status and the description of the latest complete one (else the newest)."""
    path = Path(path)
    if path.is_file():
        raise ValueError(f"{path}: a file; a checkpoint, run directory or checkpoints folder is a directory")
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint, run directory or checkpoints folder")
    is_checkpoint = (path / META_FILE).exists() or (path / DCP_METADATA_FILE).exists()
    if is_checkpoint or any(c.path == path for c in list_checkpoints(path.parent)):  # or a step-N(.tmp) dir
        return {"checkpoint": describe_checkpoint(path)}
    found = list_checkpoints(path)
    if not found:
        raise ValueError(f"{path}: not a checkpoint (no {META_FILE} or {DCP_METADATA_FILE}), and holds no "
                         "step-N checkpoint directories")
    chosen = next((c for c in reversed(found) if c.complete), found[-1])
    return {
        "checkpoints": [{"step": c.step, "path": str(c.path), "complete": c.complete, "reason": c.reason}
                        for c in found],
        "checkpoint": describe_checkpoint(chosen.path),
    }


def _count(counts: dict) -> str:
    return ", ".join(f"{dtype} x{n}" for dtype, n in counts.items()) or "none"


def _bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} GiB"


def format_description(description: dict) -> str:
    """The human-readable text `bamba-ckpt inspect` prints."""
    lines = []
    for c in description.get("checkpoints", []):
        status = "complete" if c["complete"] else f"INCOMPLETE: {c['reason']}"
        lines.append(f"  step {c['step']:>10}  {Path(c['path']).name:<24} {status}")
    if lines:
        lines = ["checkpoints:"] + lines + [""]
    info = description["checkpoint"]
    rows = [("checkpoint", info["path"]),
            ("status", "complete" if info["complete"] else f"INCOMPLETE: {info['reason']}")]
    if "step" in info:
        rows += [("step", f"{info['step']:,}"),
                 ("tokens seen", f"{info['tokens_seen']:,}" if isinstance(info["tokens_seen"], int) else "unknown"),
                 ("saved by", f"{info['world_size']} rank(s)" + (f" at {info['saved_at']}" if info.get("saved_at") else ""))]
    if info.get("source"):
        rows.append(("imported from", ", ".join(f"{k} {v}" for k, v in info["source"].items())))
    config = info.get("config")
    if config:
        rows.append(("model", config.get("error") or
                     f"hidden {config['hidden_size']}, {config['n_layers']} layers (attention at "
                     f"{config['attn_layer_indices']}), vocab {config['vocab_size']:,}"))
    if "tensors" in info:
        model, optimizer = info["tensors"]["model"], info["tensors"]["optimizer"]
        rows.append(("parameters", f"{info['parameters']:,} in {model['count']} tensors ({_count(model['dtypes'])})"))
        rows.append(("optimizer", f"{optimizer['count']} tensors ({_count(optimizer['dtypes'])})"
                     if optimizer["count"] else "none (model only)"))
    rows.append(("size on disk", f"{_bytes(info['size_bytes'])} in {info['files']} files"))
    data = info.get("data")
    if data and "error" in data:
        rows.append(("data", data["error"]))
    elif data:
        for i, (name, p) in enumerate(data.items()):
            rows.append(("data" if i == 0 else "", f"{name}: weight {p['weight']:.4g}, {p['tokens']:,} tokens, "
                         f"{p['documents']:,} documents finished, epoch {p['epoch']} "
                         f"({100 * p['epoch_fraction']:.1f}% through)"))
    width = max(len(key) for key, _ in rows)
    return "\n".join(lines + [f"{key:<{width}}  {value}" for key, value in rows])
