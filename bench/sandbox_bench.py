"""Speed of the sandbox itself (issue: sandbox must not be the bottleneck of other benches).

Runs `cosmigrate sandbox` as a separate process (its own core, as a real server
would be), then through one PyMongo async client measures:
- bulk upserts: ReplaceOne(upsert=True) in unordered bulk writes of 1,000;
- an `_id`-ordered scan of the whole collection.
References measured in the same run: the client-side cost of BSON-encoding the
same documents (what the client would spend even against an infinitely fast
server), and the same loops against the target without TLS (the sandbox's
target serves TLS like DocumentDB; `tls_vs_plain_*` is the price of that),
reported as ratios. Targets: 20,000 upserts/s and 50,000 scanned
documents/s on the 2-core development machine.

Usage: python bench/sandbox_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import bson
from pymongo import AsyncMongoClient, ReplaceOne

RESULTS = Path(__file__).parent / "results"


def make_doc(i: int) -> dict:
    return {"_id": i, "name": f"user-{i}", "n": i, "tags": ["a", "b"], "addr": {"city": "X", "zip": "12345"},
            "pad": "x" * 200}


async def run(n: int, repeats: int, tls: bool = True) -> dict:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cosmigrate", "sandbox", "--target-tls" if tls else "--target-plain",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    await proc.stdout.readline()
    target_uri = (await proc.stdout.readline()).decode().strip()
    ca_file = (await proc.stdout.readline()).decode().strip()
    client: AsyncMongoClient = AsyncMongoClient(target_uri, **({"tlsCAFile": ca_file} if ca_file else {}))
    try:
        docs = [make_doc(i) for i in range(n)]
        upsert_rates, scan_rates, encode_rates = [], [], []
        for r in range(repeats):
            coll = client.bench[f"c{r}"]
            t0 = time.perf_counter()
            for start in range(0, n, 1000):
                await coll.bulk_write([ReplaceOne({"_id": d["_id"]}, d, upsert=True) for d in docs[start:start + 1000]],
                                      ordered=False)
            upsert_rates.append(n / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            seen = 0
            async for _ in coll.find().sort("_id", 1).batch_size(1000):
                seen += 1
            assert seen == n
            scan_rates.append(n / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            for d in docs:
                bson.encode({"q": {"_id": d["_id"]}, "u": d, "upsert": True})
            encode_rates.append(n / (time.perf_counter() - t0))
            await coll.drop()
    finally:
        await client.close()
        proc.terminate()
        await proc.wait()
    up, scan, enc = (statistics.median(x) for x in (upsert_rates, scan_rates, encode_rates))
    return {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "documents": n,
        "repeats": repeats,
        "sandbox.upserts_per_s": round(up),
        "sandbox.upserts_per_s_spread": [round(min(upsert_rates)), round(max(upsert_rates))],
        "sandbox.upserts_target": 20000,
        "sandbox.scan_docs_per_s": round(scan),
        "sandbox.scan_docs_per_s_spread": [round(min(scan_rates)), round(max(scan_rates))],
        "sandbox.scan_target": 50000,
        "sandbox.client_encode_per_s": round(enc),
        "sandbox.upsert_ratio_vs_client_encode": round(up / enc, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer documents and repeats")
    args = parser.parse_args()
    n, repeats = (20_000, 2) if args.quick else (100_000, 3)
    result = asyncio.run(run(n, repeats))  # the sandbox as tests and the demo use it: the target over TLS
    plain = asyncio.run(run(n, repeats, tls=False))  # reference in the same run: the target without TLS
    result["sandbox.plain_upserts_per_s"] = plain["sandbox.upserts_per_s"]
    result["sandbox.plain_scan_docs_per_s"] = plain["sandbox.scan_docs_per_s"]
    result["sandbox.tls_vs_plain_upserts"] = round(result["sandbox.upserts_per_s"] / plain["sandbox.upserts_per_s"], 3)
    result["sandbox.tls_vs_plain_scan"] = round(result["sandbox.scan_docs_per_s"] / plain["sandbox.scan_docs_per_s"], 3)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sandbox.json").write_text(json.dumps(result, indent=2) + "\n")
    for key, value in result.items():
        mark = ""
        if key == "sandbox.upserts_per_s":
            mark = "  (target 20,000: " + ("met" if value >= 20000 else "MISSED") + ")"
        if key == "sandbox.scan_docs_per_s":
            mark = "  (target 50,000: " + ("met" if value >= 50000 else "MISSED") + ")"
        print(f"{key}: {value}{mark}")


if __name__ == "__main__":
    main()
