"""The two clocks cannot be mixed: `make check` (mypy) rejects it, and so does Python at run time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cosmigrate.clock import Mono, Wall

MIXED = '''
from cosmigrate.clock import Mono, Wall

def stale(at: Mono, since: Wall) -> bool:
    return at < since

def lag(now: Mono, caught_up: Wall) -> float:
    return now - caught_up

def bare(at: Mono) -> bool:
    return at > 0.0
'''

SAME_KIND = '''
from cosmigrate.clock import Mono, Wall

def waited(at: Mono, since: Mono) -> float:
    return at - since if at >= since else 0.0

def shown(t: Wall) -> str:
    return (t + 1.5).iso()
'''


def _mypy(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    snippet = tmp_path / "snippet.py"
    snippet.write_text(text)
    return subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", "--cache-dir", str(tmp_path / "cache"),
                           str(snippet)], capture_output=True, text=True, cwd=Path(__file__).parent.parent)


def test_mypy_rejects_a_monotonic_time_mixed_with_a_wall_time(tmp_path: Path) -> None:
    mixed = _mypy(tmp_path, MIXED)
    assert mixed.returncode == 1, mixed.stdout
    errors = [line for line in mixed.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 3, mixed.stdout  # the comparison, the subtraction and the bare float
    same = _mypy(tmp_path, SAME_KIND)
    assert same.returncode == 0, same.stdout


def test_mixing_the_clocks_is_a_type_error_at_run_time() -> None:
    mono, wall = Mono(5.0), Wall(5.0)
    with pytest.raises(TypeError):
        _ = mono < wall  # type: ignore[operator]
    with pytest.raises(TypeError):
        _ = mono - wall  # type: ignore[operator]
    with pytest.raises(TypeError):
        _ = wall >= 4.0  # type: ignore[operator]
    assert mono != wall  # never equal across kinds
    assert Mono(7.0) - mono == 2.0 and (wall + 1.0) > wall and wall.minus(5.0).iso() == "1970-01-01T00:00:00.000Z"
