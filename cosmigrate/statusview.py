"""Rendering of the status object for people: a table that fits the terminal (80 columns is enough).

Namespace names are never cut: when the table is too wide, the least useful
columns are dropped first (see COLUMNS, in the order they are kept), and a
name longer than the whole screen wraps instead of being truncated. Numbers
read as words where a bare number would puzzle ("none yet" instead of
"0 (#-1)", "none" instead of "0 in 0"). Errors are listed under the table,
one line each, where they have room. Every name and message is plain text,
never rich markup. Lag colours use the daemon's `cutover_threshold_seconds`.

Everything the daemon reports may carry names from the source (collections
are named by the customer's applications, and MongoDB takes `[/b]`, escape
sequences and bidi overrides in a name), so every value is rendered as plain
text (`rich.text.Text`, never parsed as markup) after `printable` has made
control and format characters visible instead of letting them reach the
operator's terminal (`cosmigrate.terminal`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from cosmigrate.terminal import printable

__all__ = ["plain", "printable", "render"]

DEFAULT_WIDTH = 80
GAP = 2  # spaces between columns


def plain(value: object, style: str = "") -> Text:
    """A table cell or line part: never markup, never a raw control character."""
    return Text(printable(value), style=style)


def _lag_style(lag: float, threshold: float) -> str:
    if lag >= threshold:
        return "bold red"
    if lag >= threshold / 2:
        return "yellow"
    return "green"


def _count(n: int) -> str:
    return f"{n:,}"


def _when(iso: str | None, now: str) -> str:
    """An ISO time as an age relative to the status's own clock ("3s ago"), or "never".

    The "seen" column: when the watcher last heard from the source (`last_capture_contact`)."""
    if not iso:
        return "never"
    try:
        then = dt.datetime.fromisoformat(iso.replace("Z", "+00:00"))
        ref = dt.datetime.fromisoformat(now.replace("Z", "+00:00"))
    except ValueError:
        return iso
    age = max(0.0, (ref - then).total_seconds())
    if age < 120:
        return f"{age:.0f}s ago"
    if age < 7200:
        return f"{age / 60:.0f}m ago"
    return f"{age / 3600:.0f}h ago"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


_PHASE_STYLE = {"backfill": "cyan", "dropped": "bold red", "in sync": "green", "catching up": "yellow", "capturing": "yellow", "failed": "bold red",
                "fenced": "bold red", "stopped": "red"}


def _captured(n: dict[str, Any], now: str, threshold: float) -> Text:
    return Text(_count(n["captured_events"]) if n["captured_seq"] >= 0 else "none yet")


def _applied(n: dict[str, Any], now: str, threshold: float) -> Text:
    return Text(_count(n["applied_events"]) if n["applied_seq"] >= 0 else "none yet")


def _pending(n: dict[str, Any], now: str, threshold: float) -> Text:
    if not n["pending_batches"] and not n["pending_events"]:
        return Text("none")
    return Text(_count(n["pending_events"]))  # events; the batches are in --json


def _lag(n: dict[str, Any], now: str, threshold: float) -> Text:
    return Text(f"{n['lag_seconds']:.1f}s", style=_lag_style(n["lag_seconds"], threshold))


def _phase(n: dict[str, Any], now: str, threshold: float) -> Text:
    phase = n.get("phase") or n["state"]
    shown = f"backfill {n.get('percent', 0.0):.0f}%" if phase == "backfill" else phase
    return Text(shown, style=_PHASE_STYLE.get(phase, ""))


def backfill_line(load: dict[str, Any]) -> Text | None:
    """The full load summed over every namespace still in backfill, or None when none is."""
    if not load or not load.get("namespaces_in_backfill"):
        return None
    count = load["namespaces_in_backfill"]
    eta = load.get("eta_s")
    return Text(f"backfill: {count} namespace{'s' if count != 1 else ''}, {_count(load['docs_copied'])} of "
                f"{_count(load['docs_estimated'])} documents ({load['percent']:g}%), "
                f"{load['rate_docs_per_s']:,.0f}/s over 60 s, eta {'unknown' if eta is None else _duration(eta)}", style="cyan")


def plan_line(plan: dict[str, Any]) -> Text | None:
    """The plan the migration started with next to the elapsed full load (shown while a backfill runs)."""
    if not plan or not plan.get("made_by"):
        return None
    est, elapsed = plan.get("estimated_full_load_s"), plan.get("elapsed_full_load_s")
    shown = "unknown" if est is None else ("at least " if not plan.get("estimate_complete") else "") + _duration(est)
    limit = f" ({plan['limit']})" if plan.get("limit") else ""
    ru = plan.get("estimated_ru")
    return Text(f"plan: full load {shown}{limit}, elapsed {'-' if elapsed is None else _duration(elapsed)}; "
                f"source RU {'unknown' if ru is None else _count(ru)}", style="dim")


def _contact(n: dict[str, Any], now: str, threshold: float) -> Text:
    return Text(_when(n["last_capture_contact"], now))


def _eps(n: dict[str, Any], now: str, threshold: float) -> Text:
    return Text(f"{n['throughput_eps']:.0f}")


def _deferred(n: dict[str, Any], now: str, threshold: float) -> Text:
    return Text(str(n["deferred"]) if n["deferred"] else "none", style="bold red" if n["deferred"] else "")


Cell = Callable[[dict[str, Any], str, float], Text]
# (header, justify, cell), in the order they are kept when the screen is narrow; the table shows them in this
# order too. The namespace column always comes first and is never dropped.
COLUMNS: list[tuple[str, str, Cell]] = [
    ("phase", "left", _phase),
    ("lag", "right", _lag),
    ("pending", "right", _pending),
    ("captured", "right", _captured),
    ("applied", "right", _applied),
    ("seen", "right", _contact),
    ("deferred", "right", _deferred),
    ("ev/s 60s", "right", _eps),  # the applier's rate over the last minute (NamespaceApplier status.throughput)
]


def render(status: dict[str, Any], width: int = DEFAULT_WIDTH, threshold: float | None = None) -> Group:
    """The status as a heading, a table no wider than `width`, errors, and the reasons it is not ready."""
    threshold = float(status.get("cutover_threshold_seconds") or threshold or 10.0)
    ready = status["ready_for_cutover"]
    now = status["current_time"]
    head = Text()
    head.append(printable(status["cluster_name"]), style="bold")
    if "version" in status:
        head.append(f"  v{printable(status['version'])} up {_duration(status.get('uptime_s') or 0)}")
    head.append("  writer ")
    head.append(printable(status["writer"]), style="green" if status["writer"] == "started" else "yellow")
    head.append("  gap ")
    head.append(f"{status['gap_in_seconds']:.1f}s", style=_lag_style(status["gap_in_seconds"], threshold))
    head.append(f" (ready under {threshold:g}s)  ")
    cutover = str(status.get("cutover") or "")
    if cutover == "cutover complete":  # done, not "not ready": the applications own the target now
        head.append("CUTOVER COMPLETE", style="bold cyan")
    else:
        head.append("READY FOR CUTOVER" if ready else "not ready", style="bold green" if ready else "yellow")
        if cutover.startswith(("cutover running", "cutover stopped")):
            head.append(f"  {printable(cutover)}", style="cyan")
    if status.get("insecure_target_tls"):
        head.append("  target TLS off or unverified (target.allow_insecure_tls)", style="bold red")

    namespaces = status["namespaces"]
    rows = [[_name(n)] + [cell(n, now, threshold) for _, _, cell in COLUMNS] for n in namespaces]
    widths = [max([len("namespace")] + [r[0].cell_len for r in rows])]
    widths += [max([len(header)] + [r[i + 1].cell_len for r in rows]) for i, (header, _, _) in enumerate(COLUMNS)]
    keep = len(COLUMNS)
    while keep > 0 and sum(widths[: keep + 1]) + GAP * keep > width:
        keep -= 1
    table = Table(box=None, pad_edge=False, header_style="bold", padding=(0, GAP // 2), collapse_padding=False)
    table.add_column("namespace", justify="left", overflow="fold", no_wrap=False)
    for header, justify, _ in COLUMNS[:keep]:
        table.add_column(header, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for row in rows:
        table.add_row(*row[: keep + 1])
    parts: list[Any] = [head]
    loading = backfill_line(status.get("backfill") or {})
    if loading is not None:
        parts.append(loading)
        planned = plan_line(status.get("plan") or {})
        if planned is not None:
            parts.append(planned)
    parts.append(table)
    if not namespaces:
        parts.append(Text("no namespace is being captured yet", style="dim"))
    for n in namespaces:
        if n.get("backfill_reason"):
            parts.append(Text(f"{printable(n['namespace'])}: {printable(n['backfill_reason'])}", style="red"))
        if n.get("expiry"):  # the source's TTL and the decision for it (`cosmigrate.ttl`)
            blocks = n.get("ttl_decision") in ("undecided", "unknown")
            parts.append(plain(f"{n['namespace']}: expiry: {n['expiry']}", "yellow" if blocks else "dim"))
        if n["last_error"]:
            line = Text(f"{printable(n['namespace'])}: ", style="red")
            line.append(Text(printable(n["last_error"])))
            if n.get("last_error_at"):
                line.append(Text(f" ({_when(n['last_error_at'], now)})", style="dim"))
            parts.append(line)
    if cutover == "cutover complete":
        parts.append(plain("the applications use the target now; the writer stays stopped (`ctl writer start "
                           "--force` overrides)", "dim"))
    elif not ready:
        parts.append(plain("why not: " + "; ".join(status["not_ready_reasons"]), "dim"))
    return Group(*parts)


def _name(n: dict[str, Any]) -> Text:
    return Text(printable(n["namespace"]), style={"failed": "bold red", "fenced": "bold red"}.get(n["state"], ""))
