"""What reaches the journal and `ctl status` about documents: a bounded `_id`, never a field value."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import bson
import pytest
import structlog
from bson.code import Code

from cosmigrate.apply import MAX_ID_CHARS, show_id
from cosmigrate.logs import configure_logging
from cosmigrate.sandbox import Sandbox
from tests.helpers import assert_converged, wait_for
from tests.test_apply import Running, config

LONG_ID = "customer-" + "Qlongid" * 40  # an _id that is itself a long customer value
EMAIL = "Qsecret-email@example.com"  # a unique value: a field of the document, never to be logged
SSN = "Qssn-123-45-6789"


@pytest.fixture
def journal() -> Iterator[Callable[[], list[dict]]]:
    """The daemon's log records so far (JSON lines, redaction included), as the journal would get them."""
    saved = structlog.get_config()
    configure_logging("info", "json", env={})
    out = io.StringIO()
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=out))
    try:
        yield lambda: [json.loads(line) for line in out.getvalue().splitlines()]
    finally:
        structlog.configure(**saved)


def test_show_id_is_bounded_and_typed() -> None:
    assert show_id(bson.encode({"_id": 2})) == "2"
    assert show_id(bson.encode({"_id": "culprit"})) == '"culprit"'
    long = show_id(bson.encode({"_id": LONG_ID}))
    assert long.startswith('"customer-Qlongid') and "(str, " in long and len(long) < MAX_ID_CHARS + 40
    compound = show_id(bson.encode({"_id": {"tenant": "acme", "email": EMAIL, "pad": "x" * 100}}))
    assert "(document, " in compound and len(compound) < MAX_ID_CHARS + 40
    assert "0x" not in show_id(b"\x10\x00\x00\x00garbage-bytes")  # never a hex dump of the key


async def test_writes_deferred_and_last_error_show_a_bounded_id_and_no_field_value(
    tmp_path: Path, sandbox: Sandbox, source, target, journal: Callable[[], list[dict]],
) -> None:
    for client in (source, target):
        await client.app.users.create_index("email", unique=True)
    await source.app.users.insert_one({"_id": LONG_ID, "email": "first@x", "ssn": SSN})
    await source.app.js.insert_one({"_id": LONG_ID, "f": Code("return 1"), "ssn": SSN})  # DocumentDB refuses it
    async with Running(config(tmp_path, sandbox)) as run:
        await run.writer("start")
        await wait_for(lambda: assert_converged(source, target, ["app.users"]), 30, what="initial copy")
        await target.app.users.insert_one({"_id": "stray", "email": EMAIL})  # only on the target
        await source.app.users.update_one({"_id": LONG_ID}, {"$set": {"email": EMAIL}})

        async def settled() -> bool:
            status = await run.status()
            return (run.ns_status(status, "app.users").get("deferred") == 1
                    and run.ns_status(status, "app.js").get("state") == "failed")

        await wait_for(settled, 30, what="a deferred write and a refused document")
        status = await run.status()
    error = run.ns_status(status, "app.js")["last_error"]
    assert "customer-Qlongid" in error and LONG_ID not in error and "(str, " in error, error
    assert SSN not in json.dumps(status) and EMAIL not in json.dumps(status)
    records = journal()
    deferred = [r for r in records if r.get("event", "").startswith("writes deferred")]
    assert deferred and all(len(r["example_id"]) < MAX_ID_CHARS + 40 for r in deferred), deferred
    everything = json.dumps(records)
    assert EMAIL not in everything and SSN not in everything and LONG_ID not in everything
