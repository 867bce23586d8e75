"""Configuration: broken configs fail with one line naming the key, exit 2, no traceback, no secret."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cosmigrate.config import ConfigError, load_config

SECRET = "S3cr3tPassw0rd"
GOOD = f'''
cluster_name = "prod"
[source]
uri = "mongodb://admin:{SECRET}@cosmos.example:10255/?ssl=true"
[target]
uri = "mongodb://master:{SECRET}@docdb.example:27017/?tls=true"
[store]
url = "file:///var/lib/cosmigrate/batches"
[ledger]
url = "sqlite:///var/lib/cosmigrate/ledger.db"
'''


def _replace(section: str, line: str, new: str) -> str:
    return GOOD.replace(line, new) if line in GOOD else GOOD + f"\n[{section}]\n{new}\n"


CASES = [
    ("missing cluster_name", GOOD.replace('cluster_name = "prod"', ""), "cluster_name"),
    ("bad cluster_name", GOOD.replace('"prod"', '"prod cluster!"'), "cluster_name"),
    ("missing source uri", GOOD.replace(f'uri = "mongodb://admin:{SECRET}@cosmos.example:10255/?ssl=true"', ""), "source.uri"),
    ("source uri scheme", GOOD.replace("mongodb://admin", "http://admin"), "source.uri"),
    ("target uri type", GOOD.replace(f'uri = "mongodb://master:{SECRET}@docdb.example:27017/?tls=true"', "uri = 27017"), "target.uri"),
    ("store scheme", GOOD.replace("file:///var/lib/cosmigrate/batches", "ftp://host/x"), "store.url"),
    ("s3 without bucket", GOOD.replace("file:///var/lib/cosmigrate/batches", "s3:///prefix"), "store.url"),
    ("relative store dir", GOOD.replace("file:///var/lib/cosmigrate/batches", "file://relative/dir"), "store.url"),
    ("ledger scheme", GOOD.replace("sqlite:///var/lib/cosmigrate/ledger.db", "mysql://db/x"), "ledger.url"),
    ("dynamodb without table", GOOD.replace("sqlite:///var/lib/cosmigrate/ledger.db", "dynamodb://"), "ledger.url"),
    ("unknown top-level key", GOOD + '\nclustr_name = "x"\n', "clustr_name"),
    ("unknown section key", GOOD + "\n[capture]\nmax_batch_event = 10\n", "capture.max_batch_event"),
    ("bad int type", GOOD + '\n[capture]\nmax_batch_events = "lots"\n', "capture.max_batch_events"),
    ("bad bool type", GOOD + '\n[capture]\ndeletes_preview = "yes please"\n', "capture.deletes_preview"),
    ("bad list type", GOOD + "\n[capture]\ninclude = 3\n", "capture.include"),
    ("bad start_at", GOOD + '\n[capture]\nstart_at = "yesterday"\n', "capture.start_at"),
    ("over the write limit", GOOD + "\n[capture]\nmax_batch_events = 200000\n", "capture.max_batch_events"),
    ("zero pool", GOOD + "\n[apply]\npool_size = 0\n", "apply.pool_size"),
    ("bad log level", GOOD + '\n[log]\nlevel = "loud"\n', "log.level"),
    ("section not a table", GOOD.replace("[ledger]\nurl", "ledger = 3\n[x]\nurl"), "ledger"),
    ("unreadable secret file", GOOD.replace(f"mongodb://admin:{SECRET}@cosmos.example:10255/?ssl=true", "file:/nonexistent/cosmos-uri"), "source.uri"),
    ("unset secret variable", GOOD.replace(f"mongodb://master:{SECRET}@docdb.example:27017/?tls=true", "env:COSMIGRATE_TEST_UNSET_VAR"), "target.uri"),
    ("credential outside systemd", GOOD.replace(f"mongodb://master:{SECRET}@docdb.example:27017/?tls=true", "credential:target-uri"), "target.uri"),
    ("not TOML", "cluster_name = \n[[[", "not valid TOML"),
    ("ttl not a table", GOOD.replace('cluster_name = "prod"', 'cluster_name = "prod"\nttl = "none"'), "[ttl]"),
    ("ttl key unquoted", GOOD + '\n[ttl]\napp.sessions = "none"\n', '[ttl] "app"'),
    ("ttl bad form", GOOD + '\n[ttl]\n"app.sessions" = "expire"\n', '[ttl] "app.sessions"'),
    ("ttl bad seconds", GOOD + '\n[ttl]\n"app.sessions" = "field:expiresAt:soon"\n', "expireAfterSeconds"),
    ("ttl on _ts again", GOOD + '\n[ttl]\n"app.sessions" = "field:_ts:60"\n', "not a date field"),
    ("ttl not a string", GOOD + '\n[ttl]\n"app.sessions" = 3600\n', '[ttl] "app.sessions"'),
]


@pytest.mark.parametrize("name,text,key", CASES, ids=[c[0] for c in CASES])
def test_broken_config_gives_one_line_naming_the_key(tmp_path: Path, name: str, text: str, key: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    env = {k: v for k, v in os.environ.items() if k not in ("CREDENTIALS_DIRECTORY", "SOURCE_URI", "CLUSTER_NAME")}
    result = subprocess.run([sys.executable, "-m", "cosmigrate", "run", "--config", str(path)],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert key in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert SECRET not in result.stderr + result.stdout


def test_missing_config_file(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "cosmigrate", "run", "--config", str(tmp_path / "nope.toml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "not found" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_secrets_from_env_file_and_systemd_credentials(tmp_path: Path) -> None:
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "target-uri").write_text("mongodb://t:pw@docdb:27017/?tls=true\n")
    (tmp_path / "source-uri").write_text("mongodb://s:pw@cosmos:10255/\n")
    path = tmp_path / "ok.toml"
    path.write_text(GOOD.replace(f"mongodb://admin:{SECRET}@cosmos.example:10255/?ssl=true", f"file:{tmp_path / 'source-uri'}")
                    .replace(f"mongodb://master:{SECRET}@docdb.example:27017/?tls=true", "credential:target-uri"))
    cfg = load_config(path, env={"CREDENTIALS_DIRECTORY": str(tmp_path / "creds")})
    assert cfg.source.uri == "mongodb://s:pw@cosmos:10255/" and cfg.target.uri == "mongodb://t:pw@docdb:27017/?tls=true"
    path.write_text(GOOD.replace(f"mongodb://admin:{SECRET}@cosmos.example:10255/?ssl=true", "env:MY_SOURCE"))
    assert load_config(path, env={"MY_SOURCE": "mongodb://x:y@h:1/"}).source.uri == "mongodb://x:y@h:1/"


def test_secrets_manager_arn(tmp_path: Path, moto_endpoint: str) -> None:
    import boto3

    sm = boto3.client("secretsmanager", endpoint_url=moto_endpoint, region_name="us-east-1")
    arn = sm.create_secret(Name="cosmigrate/source", SecretString='{"uri": "mongodb://u:p@cosmos:10255/"}')["ARN"]
    path = tmp_path / "sm.toml"
    path.write_text(GOOD.replace(f"mongodb://admin:{SECRET}@cosmos.example:10255/?ssl=true", arn)
                    + f'\n[aws]\nendpoint_url = "{moto_endpoint}"\nregion = "us-east-1"\n')
    assert load_config(path, env={}).source.uri == "mongodb://u:p@cosmos:10255/"
    path.write_text(path.read_text().replace(arn, arn + "-missing"))
    with pytest.raises(ConfigError, match="source.uri: cannot read secret"):
        load_config(path, env={})


def test_environment_overrides_and_old_recipe_names(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(GOOD)
    cfg = load_config(path, env={"COSMIGRATE_CAPTURE_MAX_BATCH_EVENTS": "123", "COSMIGRATE_CAPTURE_INCLUDE": "a.*, b.c",
                                 "SOURCE_URI": "mongodb://old:recipe@h:1/", "S3_CHANGE_FEED_BUCKET_NAME": "feed-bucket",
                                 "COSMIGRATE_CAPTURE_DELETES_PREVIEW": "true"})
    assert cfg.capture.max_batch_events == 123 and cfg.capture.include == ["a.*", "b.c"]
    assert cfg.source.uri == "mongodb://old:recipe@h:1/" and cfg.store.url == "s3://feed-bucket/cosmigrate"
    assert cfg.capture.deletes_preview is True
    with pytest.raises(ConfigError, match="capture.max_batch_events"):
        load_config(path, env={"COSMIGRATE_CAPTURE_MAX_BATCH_EVENTS": "many"})


def test_a_mistyped_key_gets_a_did_you_mean(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('cluster_name = "c"\n[capture]\nmax_batch_event = 10\n')
    with pytest.raises(ConfigError, match=r"capture.max_batch_event: unknown key \(did you mean capture.max_batch_events\?"):
        load_config(path, env={}, secrets=False)
    path.write_text('cluster_name = "c"\n[ledgr]\nurl = "sqlite:///tmp/x.db"\n')
    with pytest.raises(ConfigError, match=r"ledgr: unknown key \(did you mean ledger\?"):
        load_config(path, env={}, secrets=False)
