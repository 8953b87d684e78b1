"""The audit chain against the real database: one linear chain from several
appenders, every kind of tampering named at its first record, the application
role append-only, fail-closed queueing, retries through database outages,
retention with anchoring checkpoints, and the ``rmiot audit verify`` command."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import logging
import os
import random
import struct
import subprocess
import sys
import textwrap
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rmiot.audit_retention import AuditRetention
from rmiot.config import Config, ConfigError
from rmiot.security import audit, audit_cli
from rmiot.security.audit import (
    GENESIS,
    AuditLog,
    AuditRecord,
    AuditUnavailable,
    canonical,
    record_hash,
)
from rmiot.security.audit_checkpoints import (
    AuditIntegrityError,
    export_checkpoint,
    read_checkpoints,
)
from rmiot.security.audit_verify import drop_older_than, verify
from tests.conftest import eventually
from tests.security.conftest import BASE_TS, SocketProxy, make_record, via

REPO = Path(__file__).resolve().parents[2]


async def fill(dsn: str, count: int, start: int = 0, actor: str = "alice") -> None:
    log = AuditLog(dsn)
    await log.start()
    for i in range(start, start + count):
        log.append(make_record(i, actor))
    await log.stop()


def rows(dsn: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def head(dsn: str) -> tuple[int, bytes, int]:
    last_id, last_hash, count = rows(dsn, "SELECT last_id, last_hash, count FROM audit_head")[0]
    return last_id, bytes(last_hash), count


# -- the hash and the encoding -------------------------------------------------

def test_sm3_is_the_standard_hash() -> None:
    # GB/T 32905-2016 appendix A examples.
    assert audit.sm3(b"abc").hex() == \
        "66c7f0f462eeedd9d1f2d46bdc10e4e24167c4875cf2f7a2297da02b8f4ba8e0"
    assert audit.sm3(b"abcd" * 16).hex() == \
        "debe9ff92275b8a138604889c18e5a4d6fdb70e5387e5765293dcba39c0c5732"


def test_canonical_layout_is_the_documented_one() -> None:
    rec = AuditRecord(ts=datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC), actor="dr.li",
                      role=None, tenant_id=1001, method="/rmiot.QueryService/Latest",
                      object="device:7", outcome="ok", source="ipv4:10.1.2.3",
                      request_id="r-1", detail={"z": [1, 2.5], "a": "血压"}, patient="P0042")
    prev = bytes(range(32))

    def text(value: str | None) -> bytes:
        if value is None:
            return b"\xff\xff\xff\xff"
        data = value.encode()
        return len(data).to_bytes(4, "big") + data

    ts_us = 1735787045 * 1_000_000 + 678901
    expected = (prev + b"rmiot.audit.1\x00" + (42).to_bytes(8, "big", signed=True)
                + ts_us.to_bytes(8, "big", signed=True) + b"\x01" + struct.pack(">i", 1001)
                + text("dr.li") + text(None) + text("/rmiot.QueryService/Latest")
                + text("device:7") + text("ok") + text("ipv4:10.1.2.3") + text("r-1")
                + text("P0042") + text('{"a":"血压","z":[1,2.5]}'))
    assert canonical(rec, 42, prev) == expected
    assert record_hash(rec, 42, prev) == audit.sm3(expected)
    # Stored chains depend on this format never changing: pin one known answer.
    assert record_hash(rec, 42, prev).hex() == KNOWN_ANSWER


KNOWN_ANSWER = "8dc15c543871bcf01691539ffb09dc40a14733d353a57044b9fbb3a0a568d6e6"


def test_canonical_is_stable_and_sensitive() -> None:
    rec = make_record(5)
    base = canonical(rec, 6, GENESIS)
    # The same instant in another time zone, the same detail in another key order.
    beijing = timezone(timedelta(hours=8))
    shifted = AuditRecord(**{**rec.__dict__, "ts": rec.ts.astimezone(beijing),
                             "detail": dict(reversed(rec.detail.items()))})
    assert canonical(shifted, 6, GENESIS) == base
    changes: list[dict[str, Any]] = [
        {"actor": "mallory"}, {"role": "admin"}, {"tenant_id": 1}, {"method": "/x"},
        {"object": None}, {"outcome": "error"}, {"source": None}, {"request_id": "x"},
        {"detail": {}}, {"patient": "P9999"}, {"ts": rec.ts + timedelta(microseconds=1)},
        {"role": ""},
    ]
    for change in changes:
        assert canonical(AuditRecord(**{**rec.__dict__, **change}), 6, GENESIS) != base, change
    assert canonical(rec, 7, GENESIS) != base
    assert canonical(rec, 6, b"\x01" * 32) != base


@pytest.mark.parametrize("change, error", [
    ({"ts": datetime(2025, 1, 1)}, ValueError),                # naive
    ({"actor": ""}, ValueError),
    ({"actor": "a\x00b"}, ValueError),
    ({"tenant_id": 2**31}, ValueError),
    ({"detail": {"k": "v\x00"}}, ValueError),
    ({"detail": {"big": 1e300}}, ValueError),                  # jsonb would make it an integer
    ({"detail": {"obj": object()}}, TypeError),
    ({"detail": [1, 2]}, TypeError),
    ({"patient": "\udc80"}, UnicodeEncodeError),
])
async def test_unstorable_records_are_refused_at_append(chain: str, change: dict[str, Any],
                                                      error: type[Exception]) -> None:
    log = AuditLog(chain)
    await log.start()
    with pytest.raises(error):
        log.append(AuditRecord(**{**make_record(1).__dict__, **change}))
    assert log.pending == 0
    await log.stop()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)


@pytest.fixture(scope="module")
def jsonb_conn(database: str) -> Any:
    with psycopg.connect(database, autocommit=True) as conn:
        yield conn


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(detail=st.dictionaries(st.text(max_size=8), json_values, max_size=5))
def test_detail_encoding_survives_jsonb(jsonb_conn: psycopg.Connection[Any],
                                        detail: dict[str, Any]) -> None:
    """What append hashes is what verify re-encodes from the jsonb column."""
    try:
        encoded = audit._detail_bytes(detail)
    except ValueError:
        return  # refused at append (NUL, or a number beyond 64 bits): never stored
    text = jsonb_conn.execute("SELECT %s::jsonb::text", (encoded.decode(),)).fetchone()
    assert text is not None
    assert orjson.dumps(orjson.loads(text[0]), option=orjson.OPT_SORT_KEYS) == encoded


async def test_awkward_details_verify(chain: str) -> None:
    details: list[dict[str, Any]] = [
        {"f": 1e16}, {"f": 1.5e19}, {"f": -9.2e18}, {"f": -0.0}, {"f": 1e-7}, {"f": 5e-324},
        {"f": float("nan"), "g": float("inf")}, {"n": 2**64 - 1, "m": -(2**63)},
        {"nested": {"b": [1, {"y": 2, "x": 1.25}], "a": None}, "数": "值"},
        {"when": datetime(2025, 1, 1, tzinfo=UTC), "t": (1, 2)},
    ]
    log = AuditLog(chain)
    await log.start()
    for i, detail in enumerate(details):
        log.append(AuditRecord(**{**make_record(i).__dict__, "detail": detail}))
    await log.stop()
    report = verify(chain)
    assert report.ok, report.problem
    assert report.records == len(details)


# -- appending -----------------------------------------------------------------

async def test_flush_commits_everything_appended(chain: str) -> None:
    log = AuditLog(chain)
    await log.start()
    for i in range(500):
        log.append(make_record(i))
    await log.flush()
    assert log.pending == 0
    stored = rows(chain, "SELECT id, request_id, patient FROM audit_log ORDER BY id")
    assert [r[0] for r in stored] == list(range(1, 501))
    assert [r[1] for r in stored] == [f"alice-{i}" for i in range(500)]
    assert stored[1][2] == "P0001" and stored[0][2] is None
    await log.stop()
    report = verify(chain)
    assert report.ok, report.problem
    assert (report.records, report.last_id) == (500, 500)
    assert head(chain) == (500, report.head_hash, 500)


async def test_two_logs_append_one_linear_chain(chain: str) -> None:
    first, second = AuditLog(chain, batch_max=300), AuditLog(chain, batch_max=300)
    await first.start()
    await second.start()
    for i in range(3000):
        first.append(make_record(i, "first"))
        second.append(make_record(i, "second"))
        if i % 50 == 0:
            await asyncio.sleep(0)
    await asyncio.gather(first.flush(), second.flush())
    await asyncio.gather(first.stop(), second.stop())
    report = verify(chain)
    assert report.ok, report.problem
    assert report.records == 6000
    stored = rows(chain, "SELECT actor, request_id FROM audit_log ORDER BY id")
    assert sorted(r[1] for r in stored) == sorted(
        [f"first-{i}" for i in range(3000)] + [f"second-{i}" for i in range(3000)])
    # Both appenders committed batches turn about into the same chain.
    switches = sum(1 for a, b in itertools.pairwise(stored) if a[0] != b[0])
    assert switches >= 4


async def test_appenders_in_two_processes_share_one_chain(chain: str) -> None:
    script = textwrap.dedent("""
        import asyncio, sys
        from rmiot.security.audit import AuditLog
        from tests.security.conftest import make_record

        async def main():
            log = AuditLog(sys.argv[1], batch_max=100)
            await log.start()
            for i in range(2000):
                log.append(make_record(i, "child"))
                if i % 20 == 0:
                    await asyncio.sleep(0.001)
            await log.stop()
        asyncio.run(main())
    """)
    child = await asyncio.create_subprocess_exec(sys.executable, "-c", script, chain, cwd=REPO)
    log = AuditLog(chain, batch_max=100)
    await log.start()
    for i in range(2000):
        log.append(make_record(i, "parent"))
        if i % 20 == 0:
            await asyncio.sleep(0.001)
    await log.stop()
    assert await child.wait() == 0
    report = verify(chain)
    assert report.ok, report.problem
    assert report.records == 4000
    actors = [r[0] for r in rows(chain, "SELECT actor FROM audit_log ORDER BY id")]
    assert actors.count("child") == actors.count("parent") == 2000


async def test_a_held_head_lock_times_out_and_is_retried(chain: str, admin_dsn: str) -> None:
    log = AuditLog(chain, lock_timeout_s=0.1, retry_initial_s=0.01, retry_max_s=0.05)
    await log.start()
    async with await psycopg.AsyncConnection.connect(admin_dsn) as holder:
        await holder.execute("SELECT * FROM audit_head FOR UPDATE")  # another appender, stuck
        for i in range(10):
            log.append(make_record(i))
        await eventually(lambda: "lock timeout" in (log.last_error or ""), 5)
        assert log.committed == 0
        await holder.rollback()
    await asyncio.wait_for(log.flush(), 10)
    await log.stop()
    report = verify(chain)
    assert report.ok and report.records == 10, report.problem


async def test_full_queue_fails_closed(chain: str, proxy_dir: Path) -> None:
    unreachable = via(chain, proxy_dir)  # no socket there: nothing answers
    log = AuditLog(unreachable, queue_max=50, retry_initial_s=0.01, retry_max_s=0.05)
    await log.start()
    loop = asyncio.get_running_loop()
    began = loop.time()
    for i in range(50):
        log.append(make_record(i))
    assert loop.time() - began < 0.5  # the hot path never waited for the database
    with pytest.raises(AuditUnavailable, match="queue is full"):
        log.append(make_record(50))
    await eventually(lambda: log.last_error is not None, 5)
    with pytest.raises(AuditUnavailable, match="50 audit records were not committed"):
        await log.stop(timeout=0.2)
    with pytest.raises(AuditUnavailable, match="not running"):
        log.append(make_record(51))
    assert rows(chain, "SELECT count(*) FROM audit_log") == [(0,)]


async def test_unreachable_database_is_retried(chain: str, db_proxy: SocketProxy,
                                               proxy_dir: Path) -> None:
    log = AuditLog(via(chain, proxy_dir), retry_initial_s=0.01, retry_max_s=0.1)
    await log.start()
    for i in range(200):
        log.append(make_record(i))
    await eventually(lambda: log.last_error is not None, 5)
    await asyncio.sleep(0.2)
    assert log.committed == 0 and log.pending == 200
    await db_proxy.start()
    await asyncio.wait_for(log.flush(), 15)
    assert rows(chain, "SELECT count(*) FROM audit_log") == [(200,)]
    await log.stop()
    assert verify(chain).ok


async def test_connections_cut_mid_commit_store_each_record_once(
        chain: str, db_proxy: SocketProxy, proxy_dir: Path) -> None:
    await db_proxy.start()
    log = AuditLog(via(chain, proxy_dir), batch_max=200, retry_initial_s=0.005,
                   retry_max_s=0.05)
    await log.start()
    done = asyncio.Event()

    async def cutter() -> None:
        # Random moments, so some cuts land inside a commit (before, during
        # and after COMMIT), and some commits get through between them.
        chance = random.Random(7)
        while not done.is_set():
            await asyncio.sleep(chance.uniform(0.005, 0.08))
            db_proxy.cut()

    cuts = asyncio.create_task(cutter())
    for i in range(4000):
        log.append(make_record(i))
        if i % 25 == 0:
            await asyncio.sleep(0.001)
    await asyncio.wait_for(log.flush(), 60)
    done.set()
    await cuts
    await log.stop()
    assert db_proxy.accepted > 3  # connections really were cut and re-made
    stored = rows(chain, "SELECT request_id, count(*) FROM audit_log GROUP BY 1")
    assert len(stored) == 4000 and all(n == 1 for _, n in stored)
    report = verify(chain)
    assert report.ok, report.problem
    assert report.records == 4000


async def test_commit_with_a_lost_reply_is_not_stored_twice(
        chain: str, db_proxy: SocketProxy, proxy_dir: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="rmiot.audit")
    await db_proxy.start()
    db_proxy.lose_commit_replies = 3
    log = AuditLog(via(chain, proxy_dir), retry_initial_s=0.005, retry_max_s=0.05)
    await log.start()
    for round_ in range(5):
        for i in range(20):
            log.append(make_record(round_ * 20 + i))
        await asyncio.wait_for(log.flush(), 20)
    await log.stop()
    assert db_proxy.commit_replies_lost == 3
    assert sum("committed before the connection was lost" in r.getMessage()
               for r in caplog.records) == 3
    stored = rows(chain, "SELECT request_id, count(*) FROM audit_log GROUP BY 1")
    assert len(stored) == 100 and all(n == 1 for _, n in stored)
    assert verify(chain).ok


async def test_checkpoints_are_exported_periodically_and_on_stop(
        chain: str, checkpoint_file: Path) -> None:
    log = AuditLog(chain, checkpoints=checkpoint_file, checkpoint_interval_s=0.05)
    await log.start()
    for i in range(10):
        log.append(make_record(i))
    await log.flush()
    await eventually(lambda: checkpoint_file.exists() and
                     any(cp.id == 10 for cp in read_checkpoints(checkpoint_file)), 5)
    for i in range(10, 15):
        log.append(make_record(i))
    await log.stop()
    last = read_checkpoints(checkpoint_file)[-1]
    last_id, last_hash, count = head(chain)
    assert (last.id, last.hash, last.count) == (last_id, last_hash, count) == (15, last.hash, 15)
    assert verify(chain, checkpoint_file).checkpoints_checked >= 2


# -- tampering -------------------------------------------------------------------

RECORDS = 100


def _set_hash_of(conn: psycopg.Connection[Any], ident: int, outcome: str) -> None:
    """Change record ``ident``'s outcome and store a correctly recomputed hash."""
    prev = conn.execute("SELECT prev_hash FROM audit_log WHERE id = %s", (ident,)).fetchone()
    assert prev is not None
    changed = AuditRecord(**{**make_record(ident - 1).__dict__, "outcome": outcome})
    conn.execute("UPDATE audit_log SET outcome = %s, hash = %s WHERE id = %s",
                 (outcome, record_hash(changed, ident, bytes(prev[0])), ident))


def _rewrite_from(conn: psycopg.Connection[Any], ident: int) -> None:
    """Rewrite record ``ident`` and recompute every later hash and the head: a
    consistent forgery only external checkpoints can catch."""
    row = conn.execute("SELECT prev_hash FROM audit_log WHERE id = %s", (ident,)).fetchone()
    assert row is not None
    prev = bytes(row[0])
    for i in range(ident, RECORDS + 1):
        rec = make_record(i - 1)
        if i == ident:
            rec = AuditRecord(**{**rec.__dict__, "outcome": "ok", "actor": "nobody"})
            conn.execute("UPDATE audit_log SET outcome = 'ok', actor = 'nobody' WHERE id = %s",
                         (i,))
        digest = record_hash(rec, i, prev)
        conn.execute("UPDATE audit_log SET prev_hash = %s, hash = %s WHERE id = %s",
                     (prev, digest, i))
        prev = digest
    conn.execute("UPDATE audit_head SET last_hash = %s", (prev,))


def _cut_tail_and_head(conn: psycopg.Connection[Any]) -> None:
    conn.execute("DELETE FROM audit_log WHERE id > 90")
    conn.execute("UPDATE audit_head SET last_id = 90, count = 90, "
                 "last_hash = (SELECT hash FROM audit_log WHERE id = 90)")


Tamper = Callable[[psycopg.Connection[Any]], object]
CASES: list[tuple[str, Tamper, int, str, bool]] = [
    ("outcome updated", lambda c: c.execute(
        "UPDATE audit_log SET outcome = 'forged' WHERE id = 37"), 37, "altered", False),
    ("detail updated", lambda c: c.execute(
        "UPDATE audit_log SET detail = detail || '{\"rows\": 0}' WHERE id = 37"),
     37, "altered", False),
    ("time moved", lambda c: c.execute(
        "UPDATE audit_log SET ts = ts + interval '1 second' WHERE id = 37"), 37, "altered", False),
    ("first record altered", lambda c: c.execute(
        "UPDATE audit_log SET actor = 'x' WHERE id = 1"), 1, "altered", False),
    ("row deleted", lambda c: c.execute("DELETE FROM audit_log WHERE id = 37"),
     37, "missing", False),
    ("rows deleted", lambda c: c.execute("DELETE FROM audit_log WHERE id BETWEEN 37 AND 40"),
     37, "missing", False),
    ("row deleted, rest renumbered", lambda c: (
        c.execute("DELETE FROM audit_log WHERE id = 37"),
        c.execute("UPDATE audit_log SET id = id - 1 WHERE id > 37"),
        c.execute("UPDATE audit_head SET last_id = last_id - 1, count = count - 1, "
                  "last_hash = (SELECT hash FROM audit_log ORDER BY id DESC LIMIT 1)")),
     37, "reordered", False),
    ("two rows' ids swapped", lambda c: c.execute(
        "UPDATE audit_log SET id = CASE id WHEN 37 THEN 60 ELSE 37 END WHERE id IN (37, 60)"),
     37, "reordered", False),
    ("neighbours swapped", lambda c: c.execute(
        "UPDATE audit_log SET id = CASE id WHEN 37 THEN 38 ELSE 37 END WHERE id IN (37, 38)"),
     37, "reordered", False),
    ("row inserted twice", lambda c: c.execute(
        "INSERT INTO audit_log SELECT ts + interval '1 us', id, actor, role, tenant_id, method, "
        "object, outcome, source, request_id, detail, prev_hash, hash, patient "
        "FROM audit_log WHERE id = 37"), 37, "duplicate", False),
    ("hash recomputed after edit", lambda c: _set_hash_of(c, 37, "forged"), 37, "rewritten", False),
    ("two records altered", lambda c: c.execute(
        "UPDATE audit_log SET outcome = 'forged' WHERE id IN (37, 60)"), 37, "altered", False),
    ("oldest records deleted", lambda c: c.execute("DELETE FROM audit_log WHERE id < 5"),
     5, "unanchored", False),
    ("tail deleted", lambda c: c.execute("DELETE FROM audit_log WHERE id > 90"),
     91, "truncated", False),
    ("tail and head cut back", _cut_tail_and_head, 91, "truncated", True),
    ("chain rewritten consistently", lambda c: _rewrite_from(c, 37), 50, "checkpoint", True),
    ("head moved back", lambda c: c.execute(
        "UPDATE audit_head SET last_id = 99, count = 99"), 100, "head", False),
]


@pytest.mark.parametrize("tamper, expected_id, kind, needs_checkpoints",
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_verify_names_the_first_tampered_record(
        chain: str, admin_dsn: str, checkpoint_file: Path, tamper: Tamper, expected_id: int,
        kind: str, needs_checkpoints: bool) -> None:
    await fill(chain, 50)
    export_checkpoint(chain, checkpoint_file)
    await fill(chain, RECORDS - 50, start=50)
    export_checkpoint(chain, checkpoint_file)
    before = verify(chain, checkpoint_file)
    assert before.ok and before.records == RECORDS, before.problem

    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        tamper(conn)

    report = verify(chain, checkpoint_file)
    assert report.problem is not None, "tampering went unnoticed"
    assert (report.problem.id, report.problem.kind) == (expected_id, kind), report.problem
    without = verify(chain)
    if needs_checkpoints:
        # Documented limit: a forgery that also fixes the head row needs the
        # checkpoints kept outside the database.
        assert without.ok
    else:
        assert without.problem is not None
        assert (without.problem.id, without.problem.kind) == (expected_id, kind)


async def test_checkpoint_of_a_record_not_stored_names_the_truncation(
        chain: str, admin_dsn: str, checkpoint_file: Path) -> None:
    await fill(chain, 20)
    export_checkpoint(chain, checkpoint_file)
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE audit_log")
        conn.execute("UPDATE audit_head SET last_id = 0, last_hash = %s, count = 0", (GENESIS,))
    report = verify(chain, checkpoint_file)
    assert report.problem is not None
    assert (report.problem.id, report.problem.kind) == (1, "truncated")


# -- rights ----------------------------------------------------------------------

async def test_application_role_can_only_append(chain: str, admin_dsn: str) -> None:
    await fill(chain, 3)
    chunk = rows(admin_dsn, "SELECT show_chunks('audit_log')::text")[0][0]
    denied = [
        "UPDATE audit_log SET outcome = 'ok' WHERE id = 1",
        "DELETE FROM audit_log WHERE id = 1",
        "TRUNCATE audit_log",
        f"UPDATE {chunk} SET outcome = 'ok' WHERE id = 1",
        f"DELETE FROM {chunk} WHERE id = 1",
        f"TRUNCATE {chunk}",
        "INSERT INTO audit_head (last_id, last_hash, count) VALUES (0, '\\x00', 0)",
        "DELETE FROM audit_head",
        "TRUNCATE audit_head",
    ]
    with psycopg.connect(chain, autocommit=True) as conn:
        for statement in denied:
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="denied for table"):
                conn.execute(statement)
        # What the appender needs.
        with conn.transaction(force_rollback=True):
            conn.execute("SELECT * FROM audit_head FOR UPDATE")
            conn.execute("UPDATE audit_head SET updated_at = now()")
    assert verify(chain).ok


# -- retention -------------------------------------------------------------------

async def test_retention_keeps_an_anchored_chain(chain: str, admin_dsn: str,
                                                 checkpoint_file: Path) -> None:
    now = datetime.now(UTC)
    ages = [400] * 30 + [300] * 10 + [1] + [300] + [1] * 8   # id 42 is old but after id 41
    log = AuditLog(chain)
    await log.start()
    for i, days in enumerate(ages):
        log.append(make_record(i, ts=now - timedelta(days=days, microseconds=i)))
    await log.stop()
    chunks_before = len(rows(admin_dsn, "SELECT show_chunks('audit_log')"))

    with pytest.raises(ValueError, match="at least 180 days"):
        drop_older_than(admin_dsn, 179, checkpoints=checkpoint_file)
    result = drop_older_than(admin_dsn, 180, checkpoints=checkpoint_file)

    assert (result.first_id, result.removed) == (41, 40)
    ids = [r[0] for r in rows(chain, "SELECT id FROM audit_log ORDER BY id")]
    assert ids == list(range(41, 51))
    assert len(rows(admin_dsn, "SELECT show_chunks('audit_log')")) < chunks_before
    anchored = verify(chain, checkpoint_file)
    assert anchored.ok, anchored.problem
    assert (anchored.records, anchored.first_id) == (10, 41)
    bare = verify(chain)
    assert bare.problem is not None
    assert (bare.problem.id, bare.problem.kind) == (41, "unanchored")
    assert "starts after retention at id 41" in bare.problem.message
    # Nothing left to drop; the chain goes on from its head.
    assert drop_older_than(admin_dsn, 180, checkpoints=checkpoint_file).removed == 0
    await fill(chain, 5, start=100)
    assert verify(chain, checkpoint_file).records == 15


async def test_retention_refuses_a_tampered_chain(chain: str, admin_dsn: str,
                                                  checkpoint_file: Path) -> None:
    log = AuditLog(chain)
    await log.start()
    for i in range(10):
        log.append(make_record(i, ts=datetime.now(UTC) - timedelta(days=400 - i)))
    await log.stop()
    rows(admin_dsn, "UPDATE audit_log SET outcome = 'forged' WHERE id = 3 RETURNING id")
    with pytest.raises(AuditIntegrityError, match="record 3"):
        drop_older_than(admin_dsn, 180, checkpoints=checkpoint_file)
    assert rows(chain, "SELECT count(*) FROM audit_log") == [(10,)]


# -- the command -----------------------------------------------------------------

def _cli(base_cfg: Config, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RMIOT_DATABASE_NAME": base_cfg.database.name, "RMIOT_LOG_LEVEL":
           "warning"}
    return subprocess.run([sys.executable, "-m", "rmiot.security.audit_cli", *args],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=60)


async def test_verify_command_exit_codes(chain: str, admin_dsn: str, base_cfg: Config,
                                         checkpoint_file: Path) -> None:
    await fill(chain, 20)
    export_checkpoint(chain, checkpoint_file)
    ok = await asyncio.to_thread(_cli, base_cfg, "verify", "--checkpoints", str(checkpoint_file))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == f"ok: 20 records, head {head(chain)[1].hex()}"

    rows(admin_dsn, "UPDATE audit_log SET object = 'device:0' WHERE id = 7 RETURNING id")
    bad = await asyncio.to_thread(_cli, base_cfg, "verify", "--checkpoints",
                                  str(checkpoint_file))
    assert bad.returncode == 1, bad.stderr
    assert bad.stdout.startswith("FAILED: record 7: altered:")

    missing = await asyncio.to_thread(_cli, base_cfg, "verify", "--checkpoints",
                                      str(checkpoint_file.with_name("nope.jsonl")))
    assert missing.returncode == 2
    assert "cannot read checkpoint file" in missing.stderr


def test_add_parser_wires_the_audit_command(chain: str, base_cfg: Config,
                                            checkpoint_file: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="rmiot")
    audit_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["audit", "checkpoint", "--checkpoints", str(checkpoint_file)])
    assert args.handler(args, base_cfg) == 0
    assert read_checkpoints(checkpoint_file)[-1].id == 0
    assert capsys.readouterr().out.startswith("checkpoint: record 0, head ")
    args = parser.parse_args(["audit", "verify", "--checkpoints", str(checkpoint_file)])
    assert args.handler(args, base_cfg) == 0
    assert capsys.readouterr().out.strip() == f"ok: 0 records, head {GENESIS.hex()}"
    args = parser.parse_args(["audit", "retain", "--days", "30",
                              "--checkpoints", str(checkpoint_file)])
    assert args.handler(args, base_cfg) == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["audit", "verify", "--bogus"])


def test_record_defaults() -> None:
    rec = AuditRecord(actor="a", method="m", outcome="ok")
    assert rec.ts.tzinfo is not None and abs(rec.ts - datetime.now(UTC)) < timedelta(seconds=5)
    assert rec.detail == {} and rec.patient is None
    assert canonical(rec, 1, GENESIS)[32:46] == b"rmiot.audit.1\x00"
    assert BASE_TS.tzinfo is UTC


async def test_the_platform_applies_audit_retention_when_configured(
        chain: str, base_cfg: Config, checkpoint_file: Path) -> None:
    now = datetime.now(UTC)
    log = AuditLog(chain)
    await log.start()
    for i, days in enumerate([400] * 5 + [1] * 3):
        log.append(make_record(i, ts=now - timedelta(days=days, microseconds=i)))
    await log.stop()
    security = dataclasses.replace(base_cfg.security, audit_checkpoints=str(checkpoint_file))
    keep_all = AuditRetention(dataclasses.replace(base_cfg, security=security))
    await keep_all.tick()  # audit_retention_days = 0: nothing is dropped
    assert keep_all.last is None and len(rows(chain, "SELECT id FROM audit_log")) == 8
    job = AuditRetention(dataclasses.replace(base_cfg, security=dataclasses.replace(
        security, audit_retention_days=180)))
    await job.tick()
    assert job.last is not None and job.last.removed == 5
    assert verify(chain, checkpoint_file).ok
    with pytest.raises(ConfigError, match="audit_retention_days"):
        dataclasses.replace(security, audit_retention_days=30).check()
