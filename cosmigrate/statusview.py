"""Rendering of the status object for people: a rich table, colours on lag and failures."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text


def _lag_style(lag: float, threshold: float) -> str:
    if lag >= threshold:
        return "bold red"
    if lag >= threshold / 2:
        return "yellow"
    return "green"


def render(status: dict[str, Any], threshold: float = 10.0) -> Group:
    ready = status["ready_for_cutover"]
    head = Text()
    head.append(f"{status['cluster_name']}  ", style="bold")
    head.append(f"{status['current_time']}  writer ")
    head.append(status["writer"], style="green" if status["writer"] == "started" else "yellow")
    head.append("  gap ")
    head.append(f"{status['gap_in_seconds']:.1f}s", style=_lag_style(status["gap_in_seconds"], threshold))
    head.append("  ")
    head.append("READY FOR CUTOVER" if ready else "not ready", style="bold green" if ready else "yellow")
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col, justify in [("namespace", "left"), ("state", "left"), ("captured", "right"), ("applied", "right"),
                         ("pending", "right"), ("lag", "right"), ("deferred", "right"), ("events/s", "right"),
                         ("last error", "left")]:
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for n in status["namespaces"]:
        state_style = {"running": "green", "paused": "yellow", "failed": "bold red", "fenced": "bold red"}.get(n["state"], "")
        table.add_row(
            n["namespace"], Text(n["state"], style=state_style),
            f"{n['captured_events']} (#{n['captured_seq']})", f"{n['applied_events']} (#{n['applied_seq']})",
            f"{n['pending_events']} in {n['pending_batches']}",
            Text(f"{n['lag_seconds']:.1f}s", style=_lag_style(n["lag_seconds"], threshold)),
            Text(str(n["deferred"]), style="bold red" if n["deferred"] else ""),
            f"{n['throughput_eps']:.0f}", Text(n["last_error"][:80], style="red" if n["last_error"] else ""),
        )
    parts: list[Any] = [head, table]
    if not ready:
        parts.append(Text("why not: " + "; ".join(status["not_ready_reasons"]), style="dim"))
    return Group(*parts)
