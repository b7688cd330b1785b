"""Compare two runs' per-step losses (metrics.jsonl logged every step), e.g. the kernel path with
compile and every throughput option against the pure-PyTorch reference mixer, eager:

    python benchmarks/compare_losses.py RUN_DIR_A RUN_DIR_B --rel-tolerance 0.02

Prints the losses every 5 steps, the largest and mean relative difference, and PASS when every
step's relative difference is within the tolerance (exit 1 otherwise)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def step_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r.get("loss") is not None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--rel-tolerance", type=float, default=0.02)
    args = parser.parse_args()
    a, b = step_losses(args.run_a), step_losses(args.run_b)
    steps = sorted(a.keys() & b.keys())
    if not steps or len(steps) != len(a) or len(steps) != len(b):
        print(f"the runs logged different steps: {sorted(a)} vs {sorted(b)}")
        return 1
    rel = {s: abs(a[s] - b[s]) / abs(b[s]) for s in steps}
    print(f"{'step':>5} {args.run_a.name:>14} {args.run_b.name:>14} {'rel. diff':>10}")
    for s in steps:
        if s == steps[0] or s % 5 == 0 or s == steps[-1]:
            print(f"{s:>5} {a[s]:>14.4f} {b[s]:>14.4f} {rel[s]:>10.2e}")
    worst = max(steps, key=rel.get)
    ok = rel[worst] <= args.rel_tolerance
    print(f"{len(steps)} steps, loss {b[steps[0]]:.3f} -> {b[steps[-1]]:.3f}; relative difference: largest "
          f"{rel[worst]:.2e} (step {worst}), mean {sum(rel.values()) / len(rel):.2e}; tolerance "
          f"{args.rel_tolerance:g}: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
