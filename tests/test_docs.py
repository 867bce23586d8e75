"""The README documents every config key (with its default) and every status field."""

from __future__ import annotations

import tomllib
from dataclasses import fields
from pathlib import Path

from cosmigrate.config import _SECTIONS, Config
from cosmigrate.status import CLUSTER_FIELDS, NAMESPACE_FIELDS

README = (Path(__file__).parent.parent / "README.md").read_text()


def _config_block() -> dict:
    start = README.index("```toml\ncluster_name")
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


def test_every_status_field_is_documented() -> None:
    for name in CLUSTER_FIELDS + NAMESPACE_FIELDS:
        assert f"`{name}`" in README, f"status field {name} is not in the README"
