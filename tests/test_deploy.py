"""deploy/: the systemd unit passes `systemd-analyze verify` and rates at most 2.5 on `security`;
the installer stages the right files and modes; cfn-lint passes on both CloudFormation templates."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cosmigrate.config import load_config

DEPLOY = Path(__file__).parent.parent / "deploy"
UNIT = DEPLOY / "systemd" / "cosmigrate.service"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed on this machine")


@needs_analyze
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify checks that ExecStart exists: point it at this environment's installed cosmigrate.
    exe = Path(sys.executable).parent / "cosmigrate"
    assert exe.exists()
    unit = tmp_path / "cosmigrate.service"
    unit.write_text(UNIT.read_text().replace("/opt/cosmigrate/venv/bin/cosmigrate", str(exe)))
    result = subprocess.run([ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "cosmigrate.service" not in result.stderr, result.stderr  # no warnings about our unit


@needs_analyze
def test_unit_security_exposure_is_at_most_2_5() -> None:
    result = subprocess.run([ANALYZE, "security", "--offline=true", "--threshold=25", str(UNIT)],
                            capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for cosmigrate.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout[-500:] + result.stderr
    assert float(match.group(1)) <= 2.5
    assert result.returncode == 0


def test_unit_declares_what_operations_rely_on() -> None:
    text = UNIT.read_text()
    for line in ("Type=notify", "WatchdogSec=", "TimeoutStopSec=", "Restart=on-failure", "RuntimeDirectory=cosmigrate",
                 "StateDirectory=cosmigrate", "User=cosmigrate", "NoNewPrivileges=yes", "ProtectSystem=strict",
                 "CapabilityBoundingSet=\n", "SystemCallFilter=@system-service", "EnvironmentFile=-/etc/cosmigrate/",
                 "ExecReload=/bin/kill -HUP $MAINPID"):
        assert line in text, line


def test_installer_stages_files_with_safe_modes_and_keeps_edits(tmp_path: Path) -> None:
    env = dict(os.environ, COSMIGRATE_ROOT=str(tmp_path))
    script = DEPLOY / "systemd" / "install.sh"
    subprocess.run(["bash", str(script), "--skip-venv"], check=True, env=env, capture_output=True, timeout=60)
    modes = {p.relative_to(tmp_path).as_posix(): oct(p.stat().st_mode & 0o777) for p in tmp_path.rglob("*")}
    assert modes["etc/cosmigrate"] == "0o750"
    assert modes["etc/cosmigrate/cosmigrate.toml"] == "0o640"
    assert modes["etc/cosmigrate/cosmigrate.env"] == "0o600"
    assert modes["etc/cosmigrate/credentials"] == "0o700"
    assert (tmp_path / "etc/systemd/system/cosmigrate.service").read_text() == UNIT.read_text()
    config = tmp_path / "etc/cosmigrate/cosmigrate.toml"
    config.write_text(config.read_text().replace("CHANGE-ME-bucket", "my-bucket"))
    subprocess.run(["bash", str(script), "--skip-venv"], check=True, env=env, capture_output=True, timeout=60)
    assert "my-bucket" in config.read_text()  # a second run never overwrites the operator's config
    # The skeleton is a valid config once its placeholders are filled (secrets come from the env file).
    text = config.read_text().replace("CHANGE-ME-table", "ledger").replace('"CHANGE-ME"', '"prod"')
    config.write_text(text)
    cfg = load_config(config, env={"COSMIGRATE_SOURCE_URI": "mongodb://s:p@cosmos:10255/",
                                   "COSMIGRATE_TARGET_URI": "mongodb://t:p@docdb:27017/?retryWrites=false"})
    assert cfg.store.url == "s3://my-bucket/cosmigrate" and cfg.ledger.url == "dynamodb://ledger"


def test_cloudformation_templates_pass_cfn_lint() -> None:
    templates = sorted(str(p) for p in (DEPLOY / "cloudformation").glob("*.yaml"))
    assert len(templates) == 2
    cfn_lint = Path(sys.executable).parent / "cfn-lint"
    result = subprocess.run([str(cfn_lint), *templates], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_core_template_has_the_promised_protections() -> None:
    text = (DEPLOY / "cloudformation" / "core-resources.yaml").read_text()
    for needle in ("SSEAlgorithm: AES256", "BlockPublicPolicy: true", "aws:SecureTransport", "ExpirationInDays",
                   "PAY_PER_REQUEST", "PointInTimeRecoveryEnabled: true", "SSEEnabled: true", "AttributeName: expires_at",
                   "AWS::IAM::InstanceProfile", "AWS::SecretsManager::Secret", "AWS::EC2::Instance"):
        assert needle in text, needle
    docdb = (DEPLOY / "cloudformation" / "documentdb.yaml").read_text()
    for needle in ("tls: enabled", "StorageEncrypted: true", "KmsKeyId", "SourceSecurityGroupId", "AWS::DocDB::DBSubnetGroup"):
        assert needle in docdb, needle
