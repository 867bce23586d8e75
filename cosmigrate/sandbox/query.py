"""Filters, projections and update operators for the emulators.

A deliberately small subset of MongoDB's query language: what PyMongo and the
migrator send (equality, comparisons, $in/$nin, $exists, $and/$or/$nor, $not,
$regex, $size, $all, $elemMatch; $set/$unset/$inc/$setOnInsert/$push/$pull/
$min/$max/$rename). Unknown operators are refused with MongoDB's error codes
rather than silently ignored, so a test can never pass on a filter that did
not run.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

from bson.regex import Regex

from cosmigrate.sandbox.bsonvalues import is_nan_key, rank, sort_key, values_equal


class QueryError(Exception):
    """A query or update the emulator refuses; carries a MongoDB error code."""

    def __init__(self, code: int, message: str, code_name: str = "BadValue") -> None:
        super().__init__(message)
        self.code = code
        self.code_name = code_name


_MISSING = object()


def resolve(doc: Any, path: str) -> list[Any]:
    """Values at a dotted path, expanding arrays the way MongoDB does."""
    return _resolve(doc, path.split("."))


def _resolve(value: Any, parts: list[str]) -> list[Any]:
    if not parts:
        return [value]
    head, rest = parts[0], parts[1:]
    if isinstance(value, Mapping):
        if head in value:
            return _resolve(value[head], rest)
        return []
    if isinstance(value, list):
        out: list[Any] = []
        if head.isdigit() and int(head) < len(value):
            out.extend(_resolve(value[int(head)], rest))
        for item in value:
            if isinstance(item, Mapping):
                out.extend(_resolve(item, parts))
        return out
    return []


def matches(doc: Mapping[str, Any], flt: Mapping[str, Any]) -> bool:
    """True when `doc` satisfies the MongoDB filter `flt`."""
    for key, cond in flt.items():
        if key.startswith("$"):
            if not _logical(doc, key, cond):
                return False
        elif not _field_matches(doc, key, cond):
            return False
    return True


def _logical(doc: Mapping[str, Any], op: str, cond: Any) -> bool:
    if op in ("$and", "$or", "$nor"):
        if not isinstance(cond, list) or not cond:
            raise QueryError(2, f"{op} must be a nonempty array")
        results = (matches(doc, c) for c in cond)
        if op == "$and":
            return all(results)
        if op == "$or":
            return any(results)
        return not any(results)
    if op == "$comment":
        return True
    raise QueryError(2, f"unknown top level operator: {op}")


def _is_operator_doc(cond: Any) -> bool:
    return isinstance(cond, Mapping) and bool(cond) and next(iter(cond)).startswith("$")


def _field_matches(doc: Mapping[str, Any], path: str, cond: Any) -> bool:
    values = resolve(doc, path)
    if _is_operator_doc(cond):
        options = cond.get("$options", "")
        return all(
            _op_matches(values, op, arg, options) for op, arg in cond.items() if op != "$options"
        )
    return _eq_matches(values, cond)


def _expand(values: list[Any]) -> list[Any]:
    out = []
    for v in values:
        out.append(v)
        if isinstance(v, list):
            out.extend(v)
    return out


def _eq_matches(values: list[Any], target: Any) -> bool:
    if isinstance(target, (Regex, re.Pattern)):
        return _regex_matches(values, target.pattern, _flags_str(target))
    if not values:
        return target is None
    return any(values_equal(v, target) for v in _expand(values))


def _flags_str(rx: Any) -> str:
    if isinstance(rx, Regex):
        flags = rx.flags
    else:
        flags = rx.flags
    out = ""
    if flags & re.IGNORECASE:
        out += "i"
    if flags & re.MULTILINE:
        out += "m"
    if flags & re.DOTALL:
        out += "s"
    if flags & re.VERBOSE:
        out += "x"
    return out


def _regex_matches(values: list[Any], pattern: str, options: str) -> bool:
    flags = 0
    for ch in options:
        flags |= {"i": re.I, "m": re.M, "s": re.S, "x": re.X}.get(ch, 0)
    rx = re.compile(pattern, flags)
    return any(isinstance(v, str) and rx.search(v) for v in _expand(values))


def _compare(values: list[Any], arg: Any, test: Any, nan_matches_nan: bool) -> bool:
    """Range operators: only within one type bracket, and NaN apart.

    NaN sorts below every number, but mongod's matcher does not let $lt/$gt
    match NaN at all, and $lte/$gte match it only against NaN.
    """
    arg_key = sort_key(arg)
    arg_nan = is_nan_key(arg_key)
    for v in _expand(values):
        k = sort_key(v)
        if k[0] != arg_key[0]:
            continue
        if arg_nan or is_nan_key(k):
            if nan_matches_nan and arg_nan and is_nan_key(k):
                return True
        elif test(k, arg_key):
            return True
    return False


def _op_matches(values: list[Any], op: str, arg: Any, options: str) -> bool:
    if op == "$eq":
        return _eq_matches(values, arg)
    if op == "$ne":
        return not _eq_matches(values, arg)
    if op == "$gt":
        return _compare(values, arg, lambda a, b: a > b, False)
    if op == "$gte":
        return _compare(values, arg, lambda a, b: a >= b, True)
    if op == "$lt":
        return _compare(values, arg, lambda a, b: a < b, False)
    if op == "$lte":
        return _compare(values, arg, lambda a, b: a <= b, True)
    if op == "$in":
        if not isinstance(arg, list):
            raise QueryError(2, "$in needs an array")
        return any(_eq_matches(values, a) for a in arg)
    if op == "$nin":
        if not isinstance(arg, list):
            raise QueryError(2, "$nin needs an array")
        return not any(_eq_matches(values, a) for a in arg)
    if op == "$exists":
        return bool(values) == bool(arg)
    if op == "$not":
        if isinstance(arg, (Regex, re.Pattern)):
            return not _regex_matches(values, arg.pattern, _flags_str(arg))
        if not _is_operator_doc(arg):
            raise QueryError(2, "$not needs a regex or a document")
        return not all(_op_matches(values, o, a, options) for o, a in arg.items())
    if op == "$regex":
        pattern = arg.pattern if isinstance(arg, (Regex, re.Pattern)) else str(arg)
        return _regex_matches(values, pattern, options)
    if op == "$size":
        return any(isinstance(v, list) and len(v) == arg for v in values)
    if op == "$all":
        return all(_eq_matches(values, a) for a in arg)
    if op == "$elemMatch":
        for v in values:
            if isinstance(v, list):
                for item in v:
                    if _is_operator_doc(arg):
                        if all(_op_matches([item], o, a, "") for o, a in arg.items()):
                            return True
                    elif isinstance(item, Mapping) and matches(item, arg):
                        return True
        return False
    if op == "$type":
        return any(_type_matches(v, arg) for v in _expand(values))
    raise QueryError(2, f"unknown operator: {op}")


_TYPE_ALIASES = {
    "double": float, "string": str, "object": Mapping, "array": list, "bool": bool,
}


def _type_matches(value: Any, arg: Any) -> bool:
    if arg == "number":
        return rank(value) == 3
    wanted = _TYPE_ALIASES.get(arg) if isinstance(arg, str) else None
    if wanted is None:
        raise QueryError(2, f"$type {arg!r} is not supported by the sandbox")
    return isinstance(value, wanted) and not (wanted is not bool and isinstance(value, bool))


# --- projection -------------------------------------------------------------------


def project(doc: dict[str, Any], projection: Mapping[str, Any] | None) -> dict[str, Any]:
    """Apply an inclusion or exclusion projection (top-level and dotted fields)."""
    if not projection:
        return doc
    spec = {k: v for k, v in projection.items()}
    include_id = bool(spec.pop("_id", 1))
    if not spec:
        return {k: v for k, v in doc.items() if k != "_id" or include_id}
    inclusive = {bool(v) for v in spec.values()}
    if len(inclusive) > 1:
        raise QueryError(31254, "Cannot do exclusion on field in inclusion projection", "Location31254")
    if inclusive == {True}:
        out: dict[str, Any] = {}
        if include_id and "_id" in doc:
            out["_id"] = doc["_id"]
        for path in spec:
            _copy_path(doc, out, path.split("."))
        return out
    out = copy.deepcopy(doc)
    if not include_id:
        out.pop("_id", None)
    for path in spec:
        _unset(out, path.split("."))
    return out


def _copy_path(src: Mapping[str, Any], dst: dict[str, Any], parts: list[str]) -> None:
    head = parts[0]
    if head not in src:
        return
    if len(parts) == 1:
        dst[head] = src[head]
    elif isinstance(src[head], Mapping):
        sub = dst.setdefault(head, {})
        _copy_path(src[head], sub, parts[1:])


# --- updates ----------------------------------------------------------------------

UPDATE_OPERATORS = (
    "$set", "$unset", "$inc", "$mul", "$setOnInsert", "$push", "$pull", "$addToSet",
    "$min", "$max", "$rename", "$currentDate",
)


def is_operator_update(update: Mapping[str, Any]) -> bool:
    """True for `{"$set": ...}`-style updates, False for replacement documents."""
    keys = list(update.keys())
    if not keys:
        return False
    dollar = [k.startswith("$") for k in keys]
    if any(dollar) and not all(dollar):
        raise QueryError(9, "Cannot mix update operators and plain fields", "FailedToParse")
    return all(dollar)


def apply_update(doc: dict[str, Any], update: Mapping[str, Any], inserting: bool) -> dict[str, Any]:
    """Return a new document with the operator update applied (the input is not changed)."""
    out = copy.deepcopy(doc)
    for op, fields in update.items():
        if op not in UPDATE_OPERATORS:
            raise QueryError(9, f"Unknown modifier: {op}", "FailedToParse")
        if op == "$setOnInsert" and not inserting:
            continue
        for path, arg in fields.items():
            if path == "_id" or path.startswith("_id."):
                if op in ("$set", "$setOnInsert") and values_equal(out.get("_id"), arg):
                    continue
                raise QueryError(66, "Performing an update on the path '_id' would modify the immutable field '_id'", "ImmutableField")
            _apply_one(out, op, path, arg)
    return out


def _apply_one(doc: dict[str, Any], op: str, path: str, arg: Any) -> None:
    parts = path.split(".")
    if op in ("$set", "$setOnInsert"):
        _set(doc, parts, arg)
    elif op == "$unset":
        _unset(doc, parts)
    elif op in ("$inc", "$mul"):
        current = _get(doc, parts, 0)
        if not isinstance(current, (int, float)) or isinstance(current, bool):
            raise QueryError(14, f"Cannot apply {op} to a value of non-numeric type", "TypeMismatch")
        _set(doc, parts, current + arg if op == "$inc" else current * arg)
    elif op in ("$min", "$max"):
        current = _get(doc, parts, _MISSING)
        if current is _MISSING:
            _set(doc, parts, arg)
        else:
            newer = sort_key(arg) < sort_key(current)
            if (op == "$min") == newer:
                _set(doc, parts, arg)
    elif op in ("$push", "$addToSet"):
        current = _get(doc, parts, [])
        if not isinstance(current, list):
            raise QueryError(2, f"The field '{path}' must be an array", "BadValue")
        items = arg["$each"] if isinstance(arg, Mapping) and "$each" in arg else [arg]
        new = list(current)
        for item in items:
            if op == "$push" or not any(values_equal(item, x) for x in new):
                new.append(item)
        _set(doc, parts, new)
    elif op == "$pull":
        current = _get(doc, parts, _MISSING)
        if isinstance(current, list):
            if isinstance(arg, Mapping) and _is_operator_doc(arg):
                keep = [x for x in current if not all(_op_matches([x], o, a, "") for o, a in arg.items())]
            else:
                keep = [x for x in current if not values_equal(x, arg)]
            _set(doc, parts, keep)
    elif op == "$rename":
        current = _get(doc, parts, _MISSING)
        if current is not _MISSING:
            _unset(doc, parts)
            _set(doc, str(arg).split("."), current)
    elif op == "$currentDate":
        import datetime as dt

        _set(doc, parts, dt.datetime.now(dt.UTC).replace(tzinfo=None))


def _get(doc: dict[str, Any], parts: list[str], default: Any) -> Any:
    cur: Any = doc
    for p in parts:
        if isinstance(cur, Mapping) and p in cur:
            cur = cur[p]
        elif isinstance(cur, list) and p.isdigit() and int(p) < len(cur):
            cur = cur[int(p)]
        else:
            return default
    return cur


def _set(doc: dict[str, Any], parts: list[str], value: Any) -> None:
    cur: Any = doc
    for p in parts[:-1]:
        if isinstance(cur, list) and p.isdigit():
            cur = cur[int(p)]
            continue
        if p not in cur or not isinstance(cur[p], (dict, list)):
            cur[p] = {}
        cur = cur[p]
    last = parts[-1]
    if isinstance(cur, list) and last.isdigit():
        idx = int(last)
        while len(cur) <= idx:
            cur.append(None)
        cur[idx] = value
    else:
        cur[last] = value


def _unset(doc: dict[str, Any], parts: list[str]) -> None:
    cur: Any = doc
    for p in parts[:-1]:
        if isinstance(cur, Mapping) and p in cur:
            cur = cur[p]
        else:
            return
    if isinstance(cur, dict):
        cur.pop(parts[-1], None)


def equality_fields(flt: Mapping[str, Any]) -> dict[str, Any]:
    """The plain equality fields of a filter: what an upsert seeds a new document with."""
    out: dict[str, Any] = {}
    for key, cond in flt.items():
        if key.startswith("$"):
            if key == "$and":
                for sub in cond:
                    out.update(equality_fields(sub))
            continue
        if _is_operator_doc(cond):
            if "$eq" in cond:
                _set(out, key.split("."), cond["$eq"])
            continue
        _set(out, key.split("."), cond)
    return out


def sort_documents(docs: list[dict[str, Any]], spec: Mapping[str, int]) -> list[dict[str, Any]]:
    """Sort decoded documents by a MongoDB sort spec (missing fields sort as null)."""
    out = docs
    for field, direction in reversed(list(spec.items())):

        def key(doc: dict[str, Any], path: str = field) -> tuple[Any, ...]:
            return sort_key(_first(resolve(doc, path)))

        out = sorted(out, key=key, reverse=direction < 0)
    return out


def _first(values: list[Any]) -> Any:
    return values[0] if values else None
