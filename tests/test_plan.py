"""`cosmigrate plan` against the sandbox, in real processes: its estimate next to a measured full load, its
probes within their stated bounds (checked from the sandbox's counters), its scratch collection always gone,
and its one-line reasons for what it cannot know."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

from pymongo import AsyncMongoClient

from bench.plan import NS_COLL, NS_DB, counters, load, measure, run_plan
from cosmigrate.mongo import SCRATCH_DB
from cosmigrate.sandbox import Sandbox
from tests.helpers import child_env, make_config, wait_for, write_config

DOCS = int(os.environ.get("COSMIGRATE_PLAN_DOCS", "20000"))
RU_PER_S = float(os.environ.get("COSMIGRATE_PLAN_RU_PER_S", "2000"))


async def test_the_plan_estimates_a_throttled_full_load_and_its_request_units(sandbox: Sandbox) -> None:
    m = await measure(sandbox, DOCS, RU_PER_S, partitions=4)
    assert m["copied"] == DOCS
    assert m["exit_code"] == 0, m["plan"]["lacks"]
    assert m["limit"] == "source RU budget"
    assert 0.75 <= m["time_ratio"] <= 1.25, (m["estimated_s"], m["measured_s"])
    assert 0.8 <= m["ru_ratio"] <= 1.2, (m["estimated_ru"], m["charged_ru"])
    assert m["leftover_scratch"] == []
