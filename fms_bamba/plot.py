"""`fms-bamba plot RUN_DIR`: loss and tokens/s per GPU over the steps of a run, as a PNG."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl by step; a step logged again after a resume keeps its
    latest record."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (is {run_dir} a run directory?)")
    by_step: dict[int, dict] = {}
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            # The last line of a killed run may be cut short; anything else is damage.
            if number == len(lines):
                continue
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path}:{number} is not a JSON object with an integer step")
        by_step[record["step"]] = record
    return [by_step[step] for step in sorted(by_step)]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw loss and tokens/s/GPU against step into `out` (default RUN_DIR/metrics.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    if not records:
        raise ValueError(f"{Path(run_dir) / 'metrics.jsonl'} holds no records yet")
    out = Path(out) if out is not None else Path(run_dir) / "metrics.png"
    fig, (loss_ax, speed_ax) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for ax, key, label in ((loss_ax, "loss", "loss"), (speed_ax, "tokens_per_sec_per_gpu", "tokens/s per GPU")):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points])
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    speed_ax.set_xlabel("step")
    loss_ax.set_title(str(run_dir))
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
