"""benchmarks/power_summary.py: the samples under load of each GPU, from nvidia-smi's CSV."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "power_summary.py"
spec = importlib.util.spec_from_file_location("power_summary", SCRIPT)
power_summary = importlib.util.module_from_spec(spec)
spec.loader.exec_module(power_summary)

CSV = """index, clocks.current.sm [MHz], power.draw [W], clocks_event_reasons.sw_power_cap
0, 345 MHz, 80.00 W, Not Active
1, 345 MHz, 81.00 W, Not Active
0, 1980 MHz, 450.00 W, Not Active
1, 1980 MHz, 455.00 W, Not Active
0, 1600 MHz, 699.00 W, Active
1, 1500 MHz, 700.00 W, Active
0, 1500 MHz, 695.00 W, Active
1, 1400 MHz, 698.00 W, Active
"""


def test_summary_keeps_the_last_samples_under_load(tmp_path):
    path = tmp_path / "power.csv"
    path.write_text(CSV)
    lines = power_summary.summarise(power_summary.read_samples(path), min_watts=300, last=2)
    assert lines == [
        "GPU 0: 2 samples under load; SM clock median 1550 MHz (min 1500, max 1600); power median 697 W (max 699); "
        "power cap active in 2 (100%)",
        "GPU 1: 2 samples under load; SM clock median 1450 MHz (min 1400, max 1500); power median 699 W (max 700); "
        "power cap active in 2 (100%)",
    ]
    idle = power_summary.summarise(power_summary.read_samples(path), min_watts=800, last=2)
    assert idle[0] == "GPU 0: no sample at >= 800 W"


def test_csv_without_header_is_refused(tmp_path):
    path = tmp_path / "noheader.csv"
    path.write_text("0, 345 MHz, 80.00 W\n")
    with pytest.raises(ValueError, match="noheader.csv"):
        power_summary.read_samples(path)
