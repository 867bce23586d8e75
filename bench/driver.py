"""Suite 4, driver check: the same watcher read + bulk-write loop with PyMongo's AsyncMongoClient and with Motor,
and with the pinned PyMongo against the newest one.

Each reads N change events from the sandbox source's change stream (from the
beginning, raw BSON) and writes them to the target as unordered ReplaceOne
bulk writes of 1,000. Same run, same servers, alternating order.

Pinned vs newest: pyproject pins one exact PyMongo, the newest when it was
chosen (4.20.1; Cosmos DB 4.2 is accepted through the source client's shim,
README "Compatibility"). `driver_child.py` runs the same loop in a
subprocess under this venv's interpreter (the pinned PyMongo) and under
`.venv-bench-newest` (a throwaway venv with the newest PyMongo from PyPI,
created or upgraded here), alternating, and the medians are compared: a ratio
below 1 says a newer release is out and the pin costs speed again.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument
from pymongo import AsyncMongoClient, MongoClient, ReplaceOne

from bench.harness import Sandbox
from cosmigrate.mongo import change_pipeline
from cosmigrate.sandbox.cosmos import beginning_token

RAW: CodecOptions[RawBSONDocument] = CodecOptions(document_class=RawBSONDocument)
ROOT = Path(__file__).parent.parent
NEWEST_VENV = ROOT / ".venv-bench-newest"
CHILD = Path(__file__).with_name("driver_child.py")


def newest_python() -> str | None:
    """The interpreter of a venv holding the newest PyMongo release (created or upgraded now), or None offline."""
    python = NEWEST_VENV / "bin" / "python"
    try:
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(NEWEST_VENV)], check=True, capture_output=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--upgrade",
                        "pymongo"], check=True, capture_output=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"driver: no newest PyMongo to compare with ({exc})", file=sys.stderr)
        return None
    return str(python)


def child_run(python: str, source_uri: str, target_uri: str, n: int, out: str, ca_file: str = "") -> dict[str, Any]:
    """One timed run of the loop in `python` (a fresh process: only the loop itself is timed)."""
    token = base64.b64encode(bytes(beginning_token()["_data"])).decode()
    result = subprocess.run([python, str(CHILD), source_uri, target_uri, str(n), out,
                             json.dumps(change_pipeline(False)), token, ca_file],
                            check=True, capture_output=True, text=True, timeout=600, cwd="/")
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


async def loop(client: Any, target: Any, n: int, out: str) -> float:
    coll = client.bench.get_collection("events", codec_options=RAW)
    dst = target.bench.get_collection(out, codec_options=RAW)
    t0 = time.perf_counter()
    seen = 0
    ops: list[Any] = []
    stream = await coll.watch(change_pipeline(False), full_document="updateLookup", resume_after=beginning_token(),
                              max_await_time_ms=100) if isinstance(client, AsyncMongoClient) else \
        coll.watch(change_pipeline(False), full_document="updateLookup", resume_after=beginning_token(),
                   max_await_time_ms=100)
    async with stream:
        while seen < n:
            event = await stream.try_next()
            if event is None:
                continue
            seen += 1
            ops.append(ReplaceOne(event["documentKey"], event["fullDocument"], upsert=True))
            if len(ops) == 1000:
                await dst.bulk_write(ops, ordered=False)
                ops = []
    if ops:
        await dst.bulk_write(ops, ordered=False)
    return n / (time.perf_counter() - t0)


async def run_driver(n: int, repeats: int) -> dict[str, Any]:
    from motor.motor_asyncio import AsyncIOMotorClient

    with Sandbox() as sb:
        seed: MongoClient[Any] = MongoClient(sb.source_uri)
        for s in range(0, n, 5000):
            seed.bench.events.insert_many([{"_id": i, "v": i, "pad": "x" * 700} for i in range(s, min(n, s + 5000))])
        seed.close()
        native, motor = [], []
        for r in range(repeats):
            for name in (("native", "motor") if r % 2 == 0 else ("motor", "native")):
                if name == "native":
                    src, dst = AsyncMongoClient(sb.source_uri), AsyncMongoClient(sb.target_uri, tlsCAFile=sb.target_ca_file)
                    native.append(await loop(src, dst, n, f"native{r}"))
                    await src.close()
                    await dst.close()
                else:
                    msrc, mdst = AsyncIOMotorClient(sb.source_uri), AsyncIOMotorClient(sb.target_uri, tlsCAFile=sb.target_ca_file)
                    motor.append(await loop(msrc, mdst, n, f"motor{r}"))
                    msrc.close()
                    mdst.close()
        pinned_vs_newest = compare_pinned_newest(sb, n, repeats)
    a, b = median(native), median(motor)
    return {"driver.events": n, "driver.native_events_per_s": round(a), "driver.motor_events_per_s": round(b),
            "driver.ratio_native_vs_motor": round(a / b, 2), **pinned_vs_newest}


def compare_pinned_newest(sb: Sandbox, n: int, repeats: int) -> dict[str, Any]:
    """The same loop under the pinned and the newest PyMongo, alternating; medians and their ratio."""
    import pymongo

    out: dict[str, Any] = {"driver.pinned_pymongo": pymongo.__version__, "driver.newest_pymongo": None,
                           "driver.pinned_events_per_s": None, "driver.newest_events_per_s": None,
                           "driver.pinned_vs_newest_ratio": None}
    newest = newest_python()
    if newest is None:
        return out
    rates: dict[str, list[float]] = {"pinned": [], "newest": []}
    cpu: dict[str, list[float]] = {"pinned": [], "newest": []}
    for r in range(max(repeats, 5)):
        for name in (("pinned", "newest") if r % 2 == 0 else ("newest", "pinned")):
            got = child_run(sys.executable if name == "pinned" else newest, sb.source_uri, sb.target_uri, n,
                            f"{name}{r}", sb.target_ca_file)
            rates[name].append(got["events_per_s"])
            cpu[name].append(got["cpu_us_per_event"])
            out[f"driver.{name}_pymongo"] = got["pymongo"]
    # Most of a run's wall time is spent waiting for the single-threaded sandbox, whose speed (and the shared
    # machine's load) drifts between runs: wall-clock rates are reported, but the ratio compares what the driver
    # itself costs, the client process's CPU time per event, as "events per CPU-second, pinned / newest"
    # (median of the per-round ratios; each round runs both back to back). Above 1: the pinned driver is cheaper.
    paired = [q / p for p, q in zip(cpu["pinned"], cpu["newest"], strict=True)]
    out.update({"driver.pinned_events_per_s": round(median(rates["pinned"])),
                "driver.newest_events_per_s": round(median(rates["newest"])),
                "driver.pinned_cpu_us_per_event": round(median(cpu["pinned"]), 1),
                "driver.newest_cpu_us_per_event": round(median(cpu["newest"]), 1),
                "driver.pinned_vs_newest_ratio": round(median(paired), 2),
                "driver.pinned_vs_newest_rounds": [round(x, 2) for x in paired]})
    return out


if __name__ == "__main__":
    import json
    import sys

    quick = "--quick" in sys.argv
    print(json.dumps(asyncio.run(run_driver(20_000 if quick else 100_000, 2 if quick else 3)), indent=2))
