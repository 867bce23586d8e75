"""The README documents every config key (with its default) and every status field."""

from __future__ import annotations

import tomllib
from dataclasses import fields
from pathlib import Path

from cosmigrate.config import _SECTIONS, Config
from cosmigrate.status import CLUSTER_FIELDS, NAMESPACE_FIELDS

README = (Path(__file__).parent.parent / "README.md").read_text()


def _config_block() -> dict:
    start = README.index("```toml\ncluster_name", README.index("## Configuration"))
    end = README.index("```", start + 7)
    return tomllib.loads(README[start + len("```toml\n") : end])


def test_every_config_key_is_documented_with_its_default() -> None:
    documented = _config_block()
    defaults = Config()
    assert documented["cluster_name"] == defaults.cluster_name
    for section in _SECTIONS:
        obj = getattr(defaults, section)
        assert section in documented, f"[{section}] missing from the README"
        names = {f.name for f in fields(obj)}
        assert set(documented[section]) == names, f"[{section}]: README keys differ from the code"
        for name in names:
            assert documented[section][name] == getattr(obj, name), f"{section}.{name}: README default differs"


def test_the_ttl_table_is_documented_with_both_forms() -> None:
    from cosmigrate.config import parse_ttl_decision

    block = README[README.index("```toml\ncluster_name", README.index("## Configuration")):]
    block = block[: block.index("```", 7)]
    assert "\n[ttl]" in block and _config_block()["ttl"] == {}  # empty by default
    examples = [line.lstrip("# ").split("#")[0].strip() for line in block.splitlines() if line.startswith('# "')]
    decisions = [parse_ttl_decision(*(part.strip().strip('"') for part in e.split("="))) for e in examples]
    assert {d.kind for d in decisions} == {"none", "field"}


def test_every_status_field_is_documented() -> None:
    for name in CLUSTER_FIELDS + NAMESPACE_FIELDS:
        assert f"`{name}`" in README, f"status field {name} is not in the README"


# --- the README stands alone -----------------------------------------------------------------------------------------

ROOT = Path(__file__).parent.parent


def test_no_reference_to_a_design_document_that_is_not_in_the_repository() -> None:
    import subprocess

    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        path = ROOT / name
        if path.suffix in (".py", ".md", ".yaml", ".sh", ".toml", ".service") and path.exists():
            assert "DESIGN" + ".md" not in path.read_text(), name
    design = (ROOT / "docs" / "design.md").read_text()
    assert "](docs/design.md)" in README
    for topic in ("## Data layout", "## Invariants", "## Freshness", "epoch", "batch#", "LeadingKeys"):
        assert topic in design, topic


def test_one_status_section() -> None:
    assert [line for line in README.splitlines() if line.strip() == "## Status"] == ["## Status"]


def test_every_metric_family_is_documented_and_the_dashboard_uses_only_real_ones() -> None:
    import json
    import re

    from cosmigrate.metrics import FAMILIES

    for name in FAMILIES:
        assert f"`{name}" in README, f"metric {name} is not in the README"
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "cosmigrate-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {m for e in exprs for m in re.findall(r"cosmigrate_[a-z_]+", e)}
    assert used and used <= set(FAMILIES), used - set(FAMILIES)


def _section(title: str) -> str:
    start = README.index(f"## {title}")
    return README[start : README.index("\n## ", start + 4)]


def _blocks(text: str, lang: str) -> list[str]:
    import re

    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


async def test_the_five_minute_walkthrough_works_as_written(tmp_path: Path, moto_endpoint: str) -> None:
    """The walkthrough's own TOML and commands, on the sandbox, then on moto (paths and ports swapped)."""
    import asyncio
    import json
    import os
    import signal
    import subprocess
    import sys

    from cosmigrate.sandbox import Sandbox
    from tests.helpers import AWS_ENV, wait_for
    from tests.test_capture_processes import Child

    walkthrough = _section("Try it locally in 5 minutes")
    first, aws = _blocks(walkthrough, "toml")
    shell = "\n".join(_blocks(walkthrough, "bash"))
    assert "cosmigrate ledger init" in shell and "cosmigrate ctl writer start" in shell and "moto_server" in shell
    bucket_line = next(line for line in shell.splitlines() if line.startswith('python -c "import boto3'))

    def swap(text: str) -> str:
        return text.replace("/tmp/cosmigrate-try", str(tmp_path)).replace("http://127.0.0.1:5000", moto_endpoint)

    async with Sandbox() as sandbox:
        await _insert(sandbox.source_uri)
        for n, config_text in enumerate((first, first.split("[store]")[0] + aws + "\n[control]" + first.split("[control]")[1])):
            config = tmp_path / f"try{n}.toml"
            config.write_text(swap(config_text))
            env = dict(os.environ, **AWS_ENV, COSMIGRATE_CONFIG=str(config), COSMIGRATE_SOURCE_URI=sandbox.source_uri,
                       COSMIGRATE_TARGET_URI=sandbox.target_uri, COSMIGRATE_TARGET_TLS_CA_FILE=sandbox.target_ca_file)

            def cli(*args: str, env: dict[str, str] = env) -> subprocess.CompletedProcess[str]:
                return subprocess.run([sys.executable, "-m", "cosmigrate", *args], capture_output=True, text=True,
                                      timeout=60, env=env)

            if n == 1:  # the bucket, as the walkthrough creates it
                code = swap(bucket_line)[len('python -c "'):-1]
                await asyncio.to_thread(subprocess.run, [sys.executable, "-c", code], check=True, env=env, timeout=60)
            init = await asyncio.to_thread(cli, "ledger", "init")
            assert init.returncode == 0 and "created" in init.stdout, init.stderr
            child = await Child.start(config, COSMIGRATE_SOURCE_URI=sandbox.source_uri,
                                      COSMIGRATE_TARGET_URI=sandbox.target_uri,
                                      COSMIGRATE_TARGET_TLS_CA_FILE=sandbox.target_ca_file)
            try:
                async def answers() -> bool:
                    return (await asyncio.to_thread(cli, "ctl", "status")).returncode == 2

                await wait_for(answers, 60, what="the daemon, not ready yet")
                assert (await asyncio.to_thread(cli, "ctl", "writer", "start")).returncode == 0

                async def ready() -> bool:
                    result = await asyncio.to_thread(cli, "ctl", "status", "--json")
                    status = json.loads(result.stdout or "{}")
                    return result.returncode == 0 and status["namespaces"][0]["applied_events"] == 1000

                await wait_for(ready, 90, what="READY FOR CUTOVER")
                metrics = await asyncio.to_thread(cli, "ctl", "metrics")
                assert "cosmigrate_lag_seconds" in metrics.stdout
            finally:
                assert await child.finish(signal.SIGTERM) == 0


async def _insert(uri: str) -> None:
    from pymongo import AsyncMongoClient

    client: AsyncMongoClient = AsyncMongoClient(uri)
    try:
        await client.shop.orders.insert_many([{"_id": i, "total": i} for i in range(1000)])
    finally:
        await client.close()
