"""Summarise GPU clocks and power sampled by nvidia-smi during a run: is the run held back by the
card's power limit?

    nvidia-smi --query-gpu=index,clocks.sm,power.draw,clocks_event_reasons.sw_power_cap \
      --format=csv -lms 500 > power.csv &        # then the run; then kill the sampler
    python benchmarks/power_summary.py power.csv [--min-watts 300] [--last 60]

Per GPU, over the samples under load (power draw >= --min-watts; the last --last of them, to
leave out compilation): SM clock, power draw, and the share of samples in which the driver was
capping clocks for power (`sw_power_cap`), when the CSV has those columns.
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path


def read_samples(path: Path) -> list[dict[str, str]]:
    """nvidia-smi's CSV (with its header) -> one dict per row, keyed by the query's field names
    (units dropped: `clocks.current.sm [MHz]` -> `clocks.current.sm`)."""
    with path.open(newline="") as f:
        rows = [[cell.strip() for cell in row] for row in csv.reader(f) if row]
    if not rows or "index" not in rows[0]:
        raise ValueError(f"{path}: no nvidia-smi CSV header with an `index` column (use --format=csv)")
    names = [name.split(" [")[0] for name in rows[0]]
    return [dict(zip(names, row)) for row in rows[1:] if len(row) == len(names) and row[0] != rows[0][0]]


def number(cell: str) -> float:
    """'1605 MHz' -> 1605.0, '693.00 W' -> 693.0."""
    return float(cell.split()[0])


def summarise(samples: list[dict[str, str]], min_watts: float, last: int) -> list[str]:
    clock = next((k for k in samples[0] if k.startswith("clocks.") and k.endswith(".sm")), None) if samples else None
    if clock is None or "power.draw" not in samples[0]:
        raise ValueError("the CSV needs an SM clock column (clocks.sm) and power.draw")
    lines = []
    for gpu in sorted({s["index"] for s in samples}, key=int):
        loaded = [s for s in samples if s["index"] == gpu and number(s["power.draw"]) >= min_watts][-last:]
        if not loaded:
            lines.append(f"GPU {gpu}: no sample at >= {min_watts:.0f} W")
            continue
        clocks, watts = [number(s[clock]) for s in loaded], [number(s["power.draw"]) for s in loaded]
        line = (f"GPU {gpu}: {len(loaded)} samples under load; SM clock median {statistics.median(clocks):.0f} MHz "
                f"(min {min(clocks):.0f}, max {max(clocks):.0f}); power median {statistics.median(watts):.0f} W "
                f"(max {max(watts):.0f})")
        cap = "clocks_event_reasons.sw_power_cap"
        if cap in loaded[0]:
            capped = sum(s[cap] == "Active" for s in loaded)
            line += f"; power cap active in {capped} ({100 * capped / len(loaded):.0f}%)"
        lines.append(line)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("csv", type=Path)
    parser.add_argument("--min-watts", type=float, default=300.0, help="samples below this are not under load")
    parser.add_argument("--last", type=int, default=60, help="keep the last N samples under load of each GPU")
    args = parser.parse_args()
    print("\n".join(summarise(read_samples(args.csv), args.min_watts, args.last)))


if __name__ == "__main__":
    main()
