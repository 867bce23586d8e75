"""The release installs exactly the driver the tests ran: deploy/release/requirements.lock agrees with
pyproject.toml and with this venv, and install.sh refuses what would break the install (an old Python, a lock
that does not satisfy the wheel)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tomllib
import zipfile
from importlib.metadata import version as installed_version
from pathlib import Path

import pymongo
from packaging.requirements import Requirement

from tests.test_deploy import DEPLOY, _fake_release, _lock

INSTALL = DEPLOY / "systemd" / "install.sh"
LINUX = {"sys_platform": "linux", "platform_system": "Linux", "extra": ""}


def lock_problems(dependencies: list[str], lock: dict[str, tuple[str, list[str]]]) -> list[str]:
    """What keeps the lock from being the release of these pyproject dependencies, as run by these tests."""
    problems = []
    for requirement in map(Requirement, dependencies):
        if requirement.marker is not None and not requirement.marker.evaluate(LINUX):
            continue
        name = requirement.name.lower().replace("_", "-")
        if name not in lock:
            problems.append(f"{name}: not in the lock")
            continue
        locked = lock[name][0]
        if not requirement.specifier.contains(locked, prereleases=True):
            problems.append(f"{name}: the lock pins {locked}, pyproject asks {requirement.specifier}")
        if any(spec.operator == "==" for spec in requirement.specifier) and locked != installed_version(name):
            problems.append(f"{name}: the lock pins {locked}, the tests run {installed_version(name)}")
    return problems


def test_the_release_lock_agrees_with_pyproject_and_the_tests() -> None:
    dependencies = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())["project"]["dependencies"]
    lock = _lock(DEPLOY / "release" / "requirements.lock")
    assert lock_problems(dependencies, lock) == [], "run `make lock`"
    # The driver above all: one version for the tests, the release and every supported server.
    assert lock["pymongo"][0] == pymongo.__version__ == installed_version("pymongo")
    assert [r for r in dependencies if Requirement(r).name == "pymongo"] == [f"pymongo=={pymongo.__version__}"]


def test_the_check_catches_a_release_that_ships_another_driver() -> None:
    # The state this replaced: pyproject below 4.18 (what the tests ran), the lock at 4.20.1 (what shipped).
    lock = {"pymongo": ("4.20.1", [])}
    assert lock_problems(["pymongo>=4.16,<4.18"], lock) == [
        "pymongo: the lock pins 4.20.1, pyproject asks <4.18,>=4.16"]
    assert lock_problems(["pymongo==4.20.1"], {}) == ["pymongo: not in the lock"]
    assert lock_problems(["pymongo==0.1"], {"pymongo": ("0.1", [])}) == [
        f"pymongo: the lock pins 0.1, the tests run {pymongo.__version__}"]


def _run(args: list[str], stage: Path, python: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COSMIGRATE_ROOT=str(stage), PYTHON=python)
    return subprocess.run(["bash", str(INSTALL), *args], env=env, capture_output=True, text=True, timeout=300)


def test_installer_refuses_an_old_python_in_one_line_before_any_venv(tmp_path: Path) -> None:
    artefact, sha = _fake_release(tmp_path, "old-python")
    old = tmp_path / "python3"  # Amazon Linux 2023's python3
    old.write_text("#!/bin/sh\necho 3.9\n")
    old.chmod(0o755)
    for python in (str(old), str(tmp_path / "no-such-python")):
        stage = tmp_path / f"root-{Path(python).name}"
        result = _run(["--release", str(artefact), "--sha256", sha], stage, python)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, lines
        assert "3.11" in lines[0] and "PYTHON=python3.11" in lines[0] and "install python3.11" in lines[0]
        assert not (stage / "opt").exists()  # nothing created, no half-built venv
    assert "Python 3.9;" in _run(["--release", str(artefact), "--sha256", sha], tmp_path / "r", str(old)).stderr


def _wheel(*requires: str) -> bytes:
    """A minimal wheel of `cosmigrate` 9.9.9 that declares these requirements."""
    buf = io.BytesIO()
    info = "cosmigrate-9.9.9.dist-info"
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("cosmigrate_release_test/__init__.py", "")
        z.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: cosmigrate\nVersion: 9.9.9\n"
                   + "".join(f"Requires-Dist: {r}\n" for r in requires))
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return buf.getvalue()


def test_installer_runs_pip_check_and_fails_on_a_mismatch(tmp_path: Path) -> None:
    # The release's lock is empty: a wheel that needs nothing installs; one that needs the driver is refused
    # (pip install --no-deps alone would have installed it without a word).
    good, good_sha = _fake_release(tmp_path / "good", "ok", _wheel())
    done = _run(["--release", str(good), "--sha256", good_sha], tmp_path / "good-root", sys.executable)
    assert done.returncode == 0, done.stderr
    bad, bad_sha = _fake_release(tmp_path / "bad", "mismatch", _wheel(f"pymongo=={pymongo.__version__}"))
    stage = tmp_path / "bad-root"
    refused = _run(["--release", str(bad), "--sha256", bad_sha], stage, sys.executable)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip check" in lines[0] and "pymongo" in lines[0], lines
    assert not (stage / "etc/systemd/system/cosmigrate.service").exists()  # stopped before the units
