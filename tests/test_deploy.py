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
    modes = {p.relative_to(tmp_path).as_posix(): oct(p.lstat().st_mode & 0o777) for p in tmp_path.rglob("*")}
    assert modes["etc/cosmigrate"] == "0o750"
    assert modes["etc/cosmigrate/cosmigrate.toml"] == "0o640"
    assert modes["etc/cosmigrate/cosmigrate.env"] == "0o600"
    assert modes["etc/cosmigrate/credentials"] == "0o700"
    assert (tmp_path / "etc/systemd/system/cosmigrate.service").read_text() == UNIT.read_text()
    assert os.readlink(tmp_path / "usr/local/bin/cosmigrate") == "/opt/cosmigrate/venv/bin/cosmigrate"  # on PATH
    # The env-file skeleton sets nothing: placeholders can never pass check-config and start the service.
    from cosmigrate.config import read_env_file

    assert read_env_file(tmp_path / "etc/cosmigrate/cosmigrate.env") == {}
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


# --- the unit's resource limits and what control.allowed_group needs ------------------------------------------------


def _unit_settings(path: Path = UNIT) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_unit_limits_restarts_and_reload() -> None:
    unit = _unit_settings()
    # 2 = configuration error, 4 = every namespace taken over by another daemon (cosmigrate.daemon.EXIT_FENCED).
    from cosmigrate.daemon import EXIT_FENCED

    assert unit["RestartPreventExitStatus"] == [f"2 {EXIT_FENCED}"]
    assert unit["LimitCORE"] == ["0"]
    assert int(unit["LimitNOFILE"][0]) >= 16384
    assert unit["MemoryMax"] and unit["MemoryMax"][0] not in ("infinity", "")
    # A reload first checks the new file; the signal is sent only if it is accepted.
    assert unit["ExecReload"][0].endswith("cosmigrate check-config --config /etc/cosmigrate/cosmigrate.toml")
    assert unit["ExecReload"][1] == "/bin/kill -HUP $MAINPID"
    text = UNIT.read_text()
    for reason in ("MemoryMax", "LimitNOFILE", "LimitCORE"):
        comment = text[: text.index(f"\n{reason}=")].rsplit("\n", 3)
        assert any(line.startswith("#") for line in comment), f"{reason} has no reason beside it"


def test_unit_keeps_peer_credentials_usable_for_allowed_group() -> None:
    unit = _unit_settings()
    assert unit.get("PrivateUsers", ["no"]) == ["no"]  # in a user namespace every peer reads as 65534
    assert unit.get("ProtectProc", ["default"]) != ["invisible"]  # hides other users' groups
    mode = int(unit["RuntimeDirectoryMode"][0], 8)
    assert mode & 0o001 and not mode & 0o006  # others may reach the socket (its own mode decides), not list or write


@needs_analyze
def test_the_emf_forwarder_unit_verifies_and_is_hardened(tmp_path: Path) -> None:
    unit = DEPLOY / "systemd" / "cosmigrate-emf.service"
    result = subprocess.run([ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "cosmigrate-emf.service" not in result.stderr, result.stderr
    result = subprocess.run([ANALYZE, "security", "--offline=true", "--threshold=25", str(unit)],
                            capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for cosmigrate-emf.service: (\d+\.\d+)", result.stdout)
    assert match and float(match.group(1)) <= 2.5
    assert "_SYSTEMD_UNIT=cosmigrate.service _TRANSPORT=stdout" in unit.read_text()


# --- pinned releases ------------------------------------------------------------------------------------------------


def _fake_release(tmp_path: Path, marker: str, wheel: bytes = b"not used with --skip-venv") -> tuple[Path, str]:
    import hashlib
    import tarfile

    root = tmp_path / "rel" / "cosmigrate-9.9.9"
    root.mkdir(parents=True)
    (root / "VERSION").write_text("9.9.9\n")
    (root / "requirements.lock").write_text("")
    (root / "cosmigrate-9.9.9-py3-none-any.whl").write_bytes(wheel)
    for name in ("cosmigrate.service", "cosmigrate-emf.service"):
        (root / name).write_text((DEPLOY / "systemd" / name).read_text() + f"# {marker}\n")
    for name in ("amazon-cloudwatch-agent.json", "cosmigrate.logrotate"):
        (root / name).write_text((DEPLOY / "cloudwatch" / name).read_text())
    (root / "install.sh").write_text((DEPLOY / "systemd" / "install.sh").read_text())
    artefact = tmp_path / "cosmigrate-9.9.9.tar.gz"
    with tarfile.open(artefact, "w:gz") as tar:
        tar.add(root, arcname="cosmigrate-9.9.9")
    return artefact, hashlib.sha256(artefact.read_bytes()).hexdigest()


def test_installer_installs_only_a_release_whose_sha256_matches(tmp_path: Path) -> None:
    script = DEPLOY / "systemd" / "install.sh"
    artefact, sha = _fake_release(tmp_path, "from-the-release")
    stage = tmp_path / "root"
    env = dict(os.environ, COSMIGRATE_ROOT=str(stage))
    unpinned = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert unpinned.returncode == 2 and "--release" in unpinned.stderr and not stage.exists()
    wrong = subprocess.run(["bash", str(script), "--release", str(artefact), "--sha256", "0" * 64, "--skip-venv"],
                           env=env, capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2 and "sha256 mismatch" in wrong.stderr and not stage.exists(), wrong.stderr
    ok = subprocess.run(["bash", str(script), "--release", str(artefact), "--sha256", sha, "--skip-venv"],
                        env=env, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "release 9.9.9 verified" in ok.stdout
    assert (stage / "etc/systemd/system/cosmigrate.service").read_text().endswith("# from-the-release\n")
    assert (stage / "etc/systemd/system/cosmigrate-emf.service").exists()
    assert (stage / "etc/logrotate.d/cosmigrate").exists()


def test_installer_pins_pip_to_hashes_and_never_installs_by_name() -> None:
    text = (DEPLOY / "systemd" / "install.sh").read_text()
    installs = [line.strip() for line in text.splitlines() if " install " in line and "PIP" in line]
    assert installs and all("--no-deps" in line for line in installs), installs
    assert any("--require-hashes" in line and "requirements.lock" in line for line in installs)
    assert "--upgrade" not in text and "--source" not in text


def _requirement_closure() -> set[str]:
    """Every distribution cosmigrate needs at run time on Linux (its dependencies, recursively, no extras)."""
    from importlib.metadata import distribution

    from packaging.requirements import Requirement

    env = {"sys_platform": "linux", "platform_system": "Linux", "extra": ""}
    seen: set[str] = set()
    todo = [Requirement(r) for r in distribution("cosmigrate").requires or []]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = req.name.lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        todo += [Requirement(r) for r in distribution(req.name).requires or []]
    return seen


def _lock(path: Path) -> dict[str, tuple[str, list[str]]]:
    pins: dict[str, tuple[str, list[str]]] = {}
    for block in path.read_text().replace("\\\n", " ").splitlines():
        block = block.strip()
        if not block or block.startswith("#"):
            continue
        spec, *hashes = block.split("--hash=")
        name, _, version = spec.strip().partition("==")
        pins[name.lower()] = (version, [h.strip() for h in hashes])
    return pins


def test_the_lock_files_pin_and_hash_everything_and_the_build_backend_is_pinned() -> None:
    import tomllib

    lock = _lock(DEPLOY / "release" / "requirements.lock")
    for name, (version, hashes) in lock.items():
        assert re.fullmatch(r"[0-9][0-9A-Za-z.+-]*", version), name
        assert hashes and all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes), name
    missing = _requirement_closure() - set(lock)
    assert not missing, f"not pinned in deploy/release/requirements.lock: {sorted(missing)} (run `make lock`)"
    build = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())["build-system"]["requires"]
    assert all("==" in r for r in build), build
    build_lock = _lock(DEPLOY / "release" / "build-requirements.lock")
    for requirement in build:
        name, _, version = requirement.partition("==")
        assert build_lock[name.lower()][0] == version


@pytest.mark.skipif(not os.environ.get("COSMIGRATE_RELEASE_TEST"), reason="builds and installs a release from the "
                    "package index (about a minute): set COSMIGRATE_RELEASE_TEST=1")
def test_a_built_release_installs_with_require_hashes(tmp_path: Path) -> None:
    built = subprocess.run(["bash", str(DEPLOY / "release" / "build.sh"), str(tmp_path / "dist")],
                           capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, built.stderr[-2000:]
    artefact, sha = built.stdout.split()[-2:]
    env = dict(os.environ, COSMIGRATE_ROOT=str(tmp_path / "root"), PYTHON=sys.executable)
    done = subprocess.run(["bash", str(DEPLOY / "systemd" / "install.sh"), "--release", artefact, "--sha256", sha],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    version = subprocess.run([str(tmp_path / "root/opt/cosmigrate/venv/bin/cosmigrate"), "--version"],
                             capture_output=True, text=True, timeout=60)
    assert version.stdout.startswith("cosmigrate ")


# --- the templates --------------------------------------------------------------------------------------------------


def _template(name: str) -> dict:
    from cfnlint.decode import decode

    template, problems = decode(str(DEPLOY / "cloudformation" / name))
    assert not problems
    return template


def test_user_data_installs_a_pinned_release_and_starts_only_a_valid_config() -> None:
    core = _template("core-resources.yaml")
    script = core["Resources"]["MigrationInstance"]["Properties"]["UserData"]["Fn::Base64"]["Fn::Sub"][0]
    assert "sha256sum --check --strict" in script and "--sha256" in script
    assert "|| true" not in script and "raw.githubusercontent.com" not in script and "pip install" not in script
    assert "set -euo pipefail" in script
    start = script.index("systemctl start cosmigrate\n")
    assert "cosmigrate check-config" in script[:start] and script[:start].rstrip().endswith("then")
    params = core["Parameters"]
    assert params["ReleaseSha256"]["AllowedPattern"] == "([0-9a-f]{64})?" and "ReleaseVersion" in params
    assert "CosmigratePackage" not in params and "InstallerUrl" not in params


def test_security_groups_egress_only_to_the_source_https_and_the_documentdb_group() -> None:
    core = _template("core-resources.yaml")
    rules = core["Resources"]["MigrationSecurityGroup"]["Properties"]["SecurityGroupEgress"]
    egress = [r["Fn::If"][1] if "Fn::If" in r else r for r in rules]  # the source's rules exist per given range
    assert {(r["FromPort"] if isinstance(r["FromPort"], int) else r["FromPort"]["Ref"]) for r in egress} == {443, "SourcePort"}
    assert all(isinstance(r.get("CidrIp", r.get("DestinationPrefixListId")), dict) for r in egress)  # never a literal
    docdb = _template("documentdb.yaml")
    rule = docdb["Resources"]["MigrationToCluster"]["Properties"]
    assert rule["FromPort"] == 27017 and rule["DestinationSecurityGroupId"] == {"Ref": "ClusterSecurityGroup"}
    assert rule["GroupId"] == {"Ref": "MigrationSecurityGroupId"}


def test_optional_kms_endpoints_and_the_minimal_session_manager_policy() -> None:
    core = _template("core-resources.yaml")
    assert core["Parameters"]["KmsKeyArn"]["Default"] == ""
    assert core["Resources"]["S3GatewayEndpoint"]["Condition"] == "WithEndpoints"
    assert core["Resources"]["DynamoDbGatewayEndpoint"]["Condition"] == "WithEndpoints"
    policies = {p["PolicyName"]: p for p in core["Resources"]["InstanceRole"]["Properties"]["Policies"]
                if isinstance(p, dict) and "PolicyName" in p}
    (statement,) = policies["session-manager"]["PolicyDocument"]["Statement"]
    assert set(statement["Action"]) == {"ssm:UpdateInstanceInformation", "ssmmessages:CreateControlChannel",
                                        "ssmmessages:CreateDataChannel", "ssmmessages:OpenControlChannel",
                                        "ssmmessages:OpenDataChannel"}


def test_alarms_watch_metrics_cosmigrate_emits_and_the_agent_ships_them() -> None:
    import json

    from cosmigrate.metrics import EMF_CLUSTER_METRICS

    core = _template("core-resources.yaml")
    alarms = {k: v["Properties"] for k, v in core["Resources"].items() if v["Type"] == "AWS::CloudWatch::Alarm"}
    assert {a["MetricName"] for a in alarms.values()} == {"GapSeconds", "FailedNamespaces", "SourceThrottles"}
    for alarm in alarms.values():
        assert alarm["MetricName"] in EMF_CLUSTER_METRICS and alarm["Namespace"] == "cosmigrate"
        assert [d["Name"] for d in alarm["Dimensions"]] == ["Cluster"]
    assert alarms["GapAlarm"]["EvaluationPeriods"] * alarms["GapAlarm"]["Period"] == 300
    agent = json.loads((DEPLOY / "cloudwatch" / "amazon-cloudwatch-agent.json").read_text())
    collected = agent["logs"]["logs_collected"]
    assert collected["journald"]["collect_list"][0]["units"] == ["cosmigrate.service"]
    assert collected["files"]["collect_list"][0]["file_path"] == "/var/log/cosmigrate/emf.log"
    groups = {r["Properties"]["LogGroupName"]["Fn::Sub"] for r in core["Resources"].values() if r["Type"] == "AWS::Logs::LogGroup"}
    assert groups == {"/${ProjectName}/journal", "/${ProjectName}/metrics"}


def test_documentdb_password_comes_from_secrets_manager_with_engine_8_maintenance_and_audit() -> None:
    docdb = _template("documentdb.yaml")
    params = docdb["Parameters"]
    assert "MasterUserPassword" not in params
    assert "8.0.0" in params["EngineVersion"]["AllowedValues"] and docdb["Mappings"]["Family"]["8.0.0"]["Name"] == "docdb8.0"
    cluster = docdb["Resources"]["Cluster"]["Properties"]
    assert cluster["MasterUserPassword"] == {"Fn::Sub": "{{resolve:secretsmanager:${MasterSecret}:SecretString:password}}"}
    assert cluster["PreferredMaintenanceWindow"] == {"Ref": "PreferredMaintenanceWindow"}
    assert cluster["EnableCloudwatchLogsExports"]["Fn::If"][0] == "WithAuditLogs"
    assert docdb["Resources"]["ClusterParameterGroup"]["Properties"]["Parameters"]["audit_logs"] == {"Ref": "AuditLogs"}
    assert docdb["Resources"]["MasterSecretAttachment"]["Properties"]["TargetType"] == "AWS::DocDB::DBCluster"


def test_the_secret_shapes_the_templates_create_are_the_ones_the_code_reads(tmp_path: Path, moto_endpoint: str) -> None:
    import json

    import boto3

    from cosmigrate.config import ConfigError

    core = _template("core-resources.yaml")
    shape = json.loads(core["Resources"]["SourceUriSecret"]["Properties"]["SecretString"])
    client = boto3.client("secretsmanager", endpoint_url=moto_endpoint, region_name="us-east-1")
    source = client.create_secret(Name=f"s-{tmp_path.name}", SecretString=json.dumps(
        {**shape, "uri": "mongodb://u:p@cosmos:10255/?ssl=true&retrywrites=false"}))["ARN"]
    placeholder = client.create_secret(Name=f"p-{tmp_path.name}", SecretString=json.dumps(shape))["ARN"]
    # documentdb.yaml's generated secret, once attached to the cluster (Secrets Manager's documented shape).
    docdb = client.create_secret(Name=f"d-{tmp_path.name}", SecretString=json.dumps(
        {"username": "docdbadmin", "password": "a+b/c=d", "host": "x.cluster-1.docdb.amazonaws.com", "port": 27017,
         "engine": "mongo", "ssl": True, "dbClusterIdentifier": "cosmigrate-target"}))["ARN"]
    path = tmp_path / "c.toml"
    path.write_text(f'cluster_name = "x"\n[source]\nuri = "{source}"\n[target]\nuri = "{docdb}"\n'
                    f'[aws]\nendpoint_url = "{moto_endpoint}"\nregion = "us-east-1"\n')
    cfg = load_config(path, env={})
    assert cfg.source.uri == "mongodb://u:p@cosmos:10255/?ssl=true&retrywrites=false"
    assert cfg.target.uri == ("mongodb://docdbadmin:a%2Bb%2Fc%3Dd@x.cluster-1.docdb.amazonaws.com:27017/"
                              "?tls=true&replicaSet=rs0&readPreference=secondaryPreferred&retryWrites=false")
    # The stack's placeholder is refused, so the instance does not start the service before the secret is filled in.
    path.write_text(path.read_text().replace(source, placeholder))
    with pytest.raises(ConfigError, match="source.uri"):
        load_config(path, env={})


def test_first_creation_waits_for_the_release_and_a_failed_install_fails_the_stack() -> None:
    core = _template("core-resources.yaml")
    instance = core["Resources"]["MigrationInstance"]
    assert instance["CreationPolicy"]["ResourceSignal"]["Count"] == 1
    script = instance["Properties"]["UserData"]["Fn::Base64"]["Fn::Sub"][0]
    trap = script.index("trap ")
    assert "cfn-signal -e \"$rc\"" in script[trap:] and "--resource MigrationInstance" in script, script
    assert script.index("aws-cfn-bootstrap") < trap < script.index("python3.11"), "signal set before any real step"
    assert "set -euo pipefail" in script[:trap]
    # The default release location is this stack's bucket: the script waits for the object, bounded.
    loop = script[script.index("for attempt in"):script.index("done", script.index("for attempt in"))]
    assert "aws s3 cp" in loop and "sleep" in loop and "exit 1" in loop, loop
    timeout = instance["CreationPolicy"]["ResourceSignal"]["Timeout"]
    assert timeout.startswith("PT") and int(timeout[2:-1]) * 60 > 180 * 10, "the signal outwaits the release wait"
    assert "sort -V" in script and "1.300071.0" in script, "the agent's version is checked for its journald input"
    readme = (DEPLOY.parent / "README.md").read_text()
    assert "waits up to 30 minutes" in readme and "CREATE_FAILED" in readme


def test_the_source_takes_several_ranges_or_a_prefix_list() -> None:
    core = _template("core-resources.yaml")
    params = core["Parameters"]
    assert params["SourceCidr"]["Type"] == "CommaDelimitedList" and "SourcePrefixListId" in params
    rules = core["Resources"]["MigrationSecurityGroup"]["Properties"]["SecurityGroupEgress"]
    source = [r["Fn::If"][1] for r in rules if "Fn::If" in r]
    assert sum("CidrIp" in r for r in source) >= 4 and sum("DestinationPrefixListId" in r for r in source) == 1
    assert "SourceIsGiven" in core["Rules"]


def test_the_emf_log_is_where_the_cloudwatch_agent_can_read_it() -> None:
    import json

    unit = _unit_settings(DEPLOY / "systemd" / "cosmigrate-emf.service")
    assert unit.get("DynamicUser", ["no"]) == ["no"], "a dynamic user's logs sit under /var/log/private (0700)"
    assert unit["User"] == ["cosmigrate"], "a static user the installer creates"
    assert "SupplementaryGroups" in unit and "systemd-journal" in unit["SupplementaryGroups"][0]
    assert unit["LogsDirectory"] == ["cosmigrate"] and int(unit["LogsDirectoryMode"][0], 8) & 0o005 == 0o005
    assert int(unit["UMask"][0], 8) & 0o004 == 0, "emf.log readable by others (the cwagent user)"
    path = unit["StandardOutput"][0].removeprefix("append:")
    agent = json.loads((DEPLOY / "cloudwatch" / "amazon-cloudwatch-agent.json").read_text())
    files = [f["file_path"] for f in agent["logs"]["logs_collected"]["files"]["collect_list"]]
    assert path in files and path.startswith("/var/log/cosmigrate/"), (path, files)
    assert "useradd" in (DEPLOY / "systemd" / "install.sh").read_text()
    assert "su cosmigrate cosmigrate" in (DEPLOY / "cloudwatch" / "cosmigrate.logrotate").read_text()


def test_the_installer_skeleton_fails_check_config_until_every_placeholder_is_set(tmp_path: Path) -> None:
    env = dict(os.environ, COSMIGRATE_ROOT=str(tmp_path))
    subprocess.run(["bash", str(DEPLOY / "systemd" / "install.sh"), "--skip-venv"], check=True, env=env,
                   capture_output=True, timeout=60)
    config = tmp_path / "etc" / "cosmigrate" / "cosmigrate.toml"
    secrets = {"COSMIGRATE_SOURCE_URI": "mongodb://u:p@127.0.0.1:10255/?ssl=false&replicaSet=globaldb&retrywrites=false",
               "COSMIGRATE_TARGET_URI": "mongodb://u:p@127.0.0.1:27017/?tls=true&retryWrites=false"}

    def check() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cosmigrate", "check-config", "--config", str(config)],
                              capture_output=True, text=True, timeout=60, env=dict(os.environ, **secrets))

    result = check()
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    named = lines[0].split(": still")[0]
    for key in ("cluster_name", "store.url", "ledger.url", "aws.region"):
        assert key in named, lines[0]
    assert "CHANGE-ME placeholder" in lines[0] and "target.tls_ca_file" in lines[0], lines[0]
    # The stack's UserData fills in each one: afterwards no placeholder is left (the CA bundle is still missing).
    core = _template("core-resources.yaml")
    script = core["Resources"]["MigrationInstance"]["Properties"]["UserData"]["Fn::Base64"]["Fn::Sub"][0]
    sed = next(line.strip() for line in script.splitlines() if "CHANGE-ME-bucket" in line)
    for name, value in (("ChangeBatchBucket", "bkt"), ("BatchPrefix", "cosmigrate"), ("LedgerTable", "tbl"),
                        ("ClusterName", "prod"), ("AWS::Region", "eu-west-1")):
        sed = sed.replace("${" + name + "}", value)
    subprocess.run(["bash", "-c", sed.replace('"$config"', str(config))], check=True, timeout=60)
    assert not [line for line in config.read_text().splitlines() if "CHANGE-ME" in line and not line.startswith("#")]
    result = check()
    assert result.returncode == 2 and "placeholder" not in result.stderr and "tls_ca_file" in result.stderr, result.stderr
