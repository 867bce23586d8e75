"""bench/run.py: a failed suite makes the run fail, and every figure is the median of its repetitions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT))

from bench import run as bench_run  # noqa: E402


def test_a_failed_suite_is_named_and_the_others_figures_kept() -> None:
    calls = {"n": 0}

    def good() -> dict[str, Any]:
        calls["n"] += 1
        return {"x.ratio_vs_y": [0.5, 0.9, 0.7][calls["n"] - 1], "x.rate": calls["n"] * 10, "x.flag": True}

    def broken() -> dict[str, Any]:
        raise ConnectionError("no TLS CA")

    combined, per_run, failed = bench_run.run_suites([("suite A", good), ("suite B", broken)], 3)
    assert failed == [f"suite B (run {i}): ConnectionError" for i in (1, 2, 3)]
    assert combined["x.ratio_vs_y"] == 0.7 and combined["x.ratio_vs_y_runs"] == [0.5, 0.9, 0.7]
    assert combined["x.rate"] == 20 and "x.rate_runs" not in combined and combined["x.flag"] is True
    assert [r["x.rate"] for r in per_run] == [10, 20, 30]
    assert bench_run.shown(combined, "x.ratio_vs_y") == "0.7 (0.5-0.9)"


def test_latest_json_keeps_only_separate_scripts_keys(tmp_path: Path) -> None:
    path = tmp_path / "latest.json"
    path.write_text(json.dumps({"soak.rss_growth": 0.1, "verify.ratio_vs_scan": 0.6, "sandbox.upserts_per_s": 5}))
    bench_run.write_latest({"live.apply_ratio_vs_target_ceiling": 0.8}, path)
    assert json.loads(path.read_text()) == {"soak.rss_growth": 0.1, "sandbox.upserts_per_s": 5,
                                            "live.apply_ratio_vs_target_ceiling": 0.8}


@pytest.mark.parametrize("repeats", ["0", "-1"])
def test_bad_repeats_is_one_line_and_exit_2(repeats: str) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--repeats", repeats],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "--repeats" in out.stderr
