"""The progress line: at `info`, once per `log.progress_interval_s` (a minute), one line per namespace.

`journalctl -u cosmigrate` shows only the message, so the numbers are in it
("sales.orders: captured 1200, applied 1150, lag 2.1s, catching up"), and again
as fields (`COSMIGRATE_CAPTURED`, `COSMIGRATE_LAG_S`, `COSMIGRATE_PHASE`, ...)
for filters and the CloudWatch agent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from cosmigrate.ledger import LedgerError
from cosmigrate.logs import get_logger
from cosmigrate.status import build_status

if TYPE_CHECKING:
    from cosmigrate.worker import Worker


def progress_message(n: Mapping[str, Any]) -> str:
    text = (f"{n['namespace']}: captured {n['captured_events']}, applied {n['applied_events']}, "
            f"lag {n['lag_seconds']:.1f}s, {n['phase']}")
    if n.get("load_phase") == "backfill":
        eta = n.get("eta_s")
        text += (f" {n['percent']:g}% of about {n['docs_estimated']} documents, {n['rate_docs_per_s']:.0f}/s, "
                 f"eta {'unknown' if eta is None else f'{eta:.0f}s'}")
    return text


async def progress_loop(worker: Worker, interval_s: float) -> None:
    log = get_logger(component="progress")
    while True:
        await asyncio.sleep(interval_s)
        try:
            status = await build_status(worker)
        except LedgerError as exc:
            log.warning("progress: the ledger did not answer", error=str(exc))
            continue
        for n in status["namespaces"]:
            log.info(progress_message(n), namespace=n["namespace"], captured=n["captured_events"],
                     applied=n["applied_events"], pending=n["pending_events"], lag_s=n["lag_seconds"],
                     phase=n["phase"], state=n["state"], docs_copied=n.get("docs_copied"),
                     docs_estimated=n.get("docs_estimated"), percent=n.get("percent"), eta_s=n.get("eta_s"),
                     indexes=n.get("indexes"))
