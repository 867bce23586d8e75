"""Rendering of the status object for people: a rich table, colours on lag and failures.

Everything the daemon reports may carry names from the source (collections
are named by the customer's applications, and MongoDB takes `[/b]`, escape
sequences and bidi overrides in a name), so every value is rendered as plain
text (`rich.text.Text`, never parsed as markup) after `printable` has made
control and format characters visible instead of letting them reach the
operator's terminal (`cosmigrate.terminal`).
"""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from cosmigrate.terminal import printable

__all__ = ["plain", "printable", "render"]


def plain(value: object, style: str = "") -> Text:
    """A table cell or line part: never markup, never a raw control character."""
    return Text(printable(value), style=style)


def _lag_style(lag: float, threshold: float) -> str:
    if lag >= threshold:
        return "bold red"
    if lag >= threshold / 2:
        return "yellow"
    return "green"


def render(status: dict[str, Any], threshold: float = 10.0) -> Group:
    ready = status["ready_for_cutover"]
    head = Text()
    head.append(f"{printable(status['cluster_name'])}  ", style="bold")
    head.append(f"{printable(status['current_time'])}  writer ")
    head.append(printable(status["writer"]), style="green" if status["writer"] == "started" else "yellow")
    head.append("  gap ")
    head.append(f"{status['gap_in_seconds']:.1f}s", style=_lag_style(status["gap_in_seconds"], threshold))
    head.append("  ")
    head.append("READY FOR CUTOVER" if ready else "not ready", style="bold green" if ready else "yellow")
    if status.get("insecure_target_tls"):
        head.append("  target TLS off or unverified (target.allow_insecure_tls)", style="bold red")
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col, justify in [("namespace", "left"), ("state", "left"), ("captured", "right"), ("applied", "right"),
                         ("pending", "right"), ("lag", "right"), ("deferred", "right"), ("events/s", "right"),
                         ("last error", "left")]:
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for n in status["namespaces"]:
        state_style = {"running": "green", "paused": "yellow", "failed": "bold red", "fenced": "bold red"}.get(n["state"], "")
        table.add_row(
            plain(n["namespace"]), plain(n["state"], state_style),
            plain(f"{n['captured_events']} (#{n['captured_seq']})"), plain(f"{n['applied_events']} (#{n['applied_seq']})"),
            plain(f"{n['pending_events']} in {n['pending_batches']}"),
            plain(f"{n['lag_seconds']:.1f}s", _lag_style(n["lag_seconds"], threshold)),
            plain(n["deferred"], "bold red" if n["deferred"] else ""),
            plain(f"{n['throughput_eps']:.0f}"), plain(printable(n["last_error"])[:80], "red" if n["last_error"] else ""),
        )
    parts: list[Any] = [head, table]
    if not ready:
        parts.append(plain("why not: " + "; ".join(status["not_ready_reasons"]), "dim"))
    return Group(*parts)
