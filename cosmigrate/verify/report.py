"""The verification report: what `cosmigrate verify --report FILE` writes and cutover stores.

JSON, for people and scripts. Per namespace: documents at the source,
documents verified equal, mismatches; then up to N mismatches, each with its
`_id` (relaxed Extended JSON: the only document value that ever appears),
its kind (missing / extra / different) and, for `different`, the first
differing field path and what differs there. Collections that the target
cannot hold the same way are listed with the reason, never skipped silently.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from bson import json_util

from cosmigrate.clock import Wall
from cosmigrate.idorder import IdDoc, id_value
from cosmigrate.verify.passes import NamespaceVerifier


def iso(ts: float) -> str | None:
    if not ts:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def show_id(doc_id: IdDoc) -> Any:
    """An `_id` as relaxed Extended JSON (a JSON value: 42, "abc", {"$oid": ...})."""
    import json

    return json.loads(json_util.dumps(id_value(doc_id), json_options=json_util.RELAXED_JSON_OPTIONS))


def build(cluster: str, verifiers: Mapping[str, NamespaceVerifier], limit: int, started_at: Wall, finished_at: Wall,
          notes: Mapping[str, str] | None = None) -> dict[str, Any]:
    notes = notes or {}
    namespaces = []
    listed: list[dict[str, Any]] = []
    total = 0
    for ns in sorted(verifiers):
        v = verifiers[ns]
        s = v.state
        complete = s.finished_at is not None
        total += v.mismatch_count
        namespaces.append({
            "namespace": ns, "source_documents": s.docs, "verified": s.equal, "mismatches": v.mismatch_count,
            "pass": s.number, "complete": complete, "finished_at": s.finished_at.iso() if s.finished_at is not None else None,
            **({"note": notes[ns]} if ns in notes else {}),
        })
        for m in v.mismatches.values():
            if len(listed) >= limit:
                break
            listed.append({"namespace": ns, "_id": show_id(m.id), "kind": m.kind,
                           **({"path": m.path, "difference": m.difference} if m.kind == "different" else {})})
    equal = total == 0 and all(n["complete"] for n in namespaces)
    return {
        "cluster_name": cluster,
        "started_at": started_at.iso(),
        "finished_at": finished_at.iso(),
        "equal": equal,
        "verdict": "the target equals the source, document for document, byte for byte" if equal else
                   f"{total} documents differ" if total else "verification is not complete",
        "namespaces": namespaces,
        "mismatches_total": total,
        "mismatches": listed,
        "not_comparable_as_is": [{"namespace": ns, "reason": why} for ns, why in sorted(notes.items())],
    }
