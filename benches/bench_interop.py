"""``make bench-interop``: issue 11's figures, in a database of its own.

1. ``hl7_oru_msgs_per_s``: ORU^R01 messages (4 OBX each: heart rate, SpO2,
   respiratory rate, temperature, one device and time per message) streamed by
   a load process over ``CONNECTIONS`` MLLP connections (pipelined, up to
   ``WINDOW`` unanswered each) into the HL7 listener of an ingest process,
   each answered AA only after its frame is committed to TimescaleDB. Goal
   >= 2,000 a second.
2. ``fhir_observation_search_p99_ms``: FHIR Observation searches (by patient
   with a code and a day's window, by device over a day, by patient without
   a code), ``_count`` 100, by a hospital administrator and a clinician over
   HTTP, ``CLIENTS`` at a time from a process of their own, on a dataset built
   here: ``MONITORS`` monitors in ten wards, a frame of 8 vitals a minute each
   for ``DAYS`` days, a patient bound to every fourth. (The lead's ``rmiot
   dataset`` district is larger and has no FHIR users; this one is built in
   seconds and is the same shape.)
   Goal p99 <= 100 ms.

The last line is one JSON object, with the 1-minute load average at its end
(the machine is shared: read the figures against it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import multiprocessing
import os
import random
import shutil
import time
from typing import Any

import aiohttp
import psycopg
import uvloop
from common import cpu_s, fresh_database, say  # benches/common.py

from rmiot import db
from rmiot.config import Config
from rmiot.ingest.hl7.listener import Hl7Listener
from rmiot.ingest.hl7.mllp import END, START
from rmiot.ingest.service import IngestService
from rmiot.query.fhir.api import FhirApi
from rmiot.security import identity
from rmiot.security.patient_keys import PatientKeys, register_patient
from rmiot.security.patients import PatientIdentity, pseudonym_key
from rmiot.security.service import SecurityServices
from rmiot.security.sm4 import Keyring
from rmiot.tenants import store as tenants

DATABASE = "rmiot_bench_interop"
MESSAGES = 30_000
CONNECTIONS = 8
WINDOW = 200
DEVICES = 400
MONITORS = 400
DAYS = 3
CLIENTS = 4
SEARCH_SECONDS = 20.0
PASSWORD = "Bench-Interop-9"
GOALS = {"hl7_oru_msgs_per_s": 2000.0, "fhir_observation_search_p99_ms": 100.0}


@dataclasses.dataclass
class World:
    code: str
    hospital: int
    wards: list[int]
    devices: list[int]
    monitors: list[int]
    patients: list[int]


def build(cfg: Config, dsn: str) -> World:
    keys = Keyring.load(cfg.keyring_dir)
    with psycopg.connect(dsn, autocommit=True) as conn:
        region = tenants.create_tenant(conn, "bi-region", "Region", "region")
        hospital = tenants.create_tenant(conn, "bi-h1", "Hospital 1", "hospital", region)
        wards = [tenants.create_tenant(conn, f"bi-w{i}", f"Ward {i}", "department", hospital)
                 for i in range(10)]
        ids = [r[0] for r in conn.execute(
            "INSERT INTO devices (id, tenant_id, department_id, state, serial_no) "
            "SELECT nextval('device_id_seq'), %s, (%s::int[])[1 + g %% 10], 'active', 'm' || g "
            "FROM generate_series(1, %s) g RETURNING id",
            (hospital, wards, DEVICES + MONITORS)).fetchall()]
        devices, monitors = ids[:DEVICES], ids[DEVICES:]
        conn.execute("INSERT INTO authz_grants (subject, role, tenant_id) VALUES "
                     "('mllp:bi-h1', 'his_interface', %s), "
                     "('user:bench-admin', 'hospital_admin', %s), "
                     "('user:bench-clinician', 'clinician', %s)", (hospital, hospital, hospital))
        say(f"dataset: {MONITORS} monitors x {DAYS} days of a frame a minute ...")
        start = time.monotonic()
        hi = dt.datetime.now(dt.UTC).replace(second=0, microsecond=0)
        lo = hi - dt.timedelta(days=DAYS)
        for d in range(DAYS):
            conn.execute(
                "INSERT INTO telemetry (ts, device_id, tenant_id, seq, kind, metrics, vals) "
                "SELECT %(lo)s + m * interval '1 minute', dev, %(h)s, m, 1, '{1,2,3,4,5,6,7,8}', "
                "       ARRAY[70 + random() * 20, 95 + random() * 4, 14 + random() * 6, "
                "             36.3 + random(), 115 + random() * 15, 70 + random() * 10, "
                "             88 + random() * 8, 70 + random() * 20] "
                "  FROM unnest(%(devs)s::bigint[]) dev, generate_series(%(a)s::int, %(b)s::int) m",
                {"lo": lo, "h": hospital, "devs": monitors, "a": d * 1440,
                 "b": (d + 1) * 1440 - 1})
        patients = []
        pkeys, pkey = PatientKeys(keys), pseudonym_key(cfg.keyring_dir)
        for n, device in enumerate(monitors[::4]):
            patient, _ = register_patient(conn, pkeys, pkey, hospital,
                                          PatientIdentity(f"Patient {n}", f"BENCH{n:08d}"))
            patients.append(patient)
            conn.execute("INSERT INTO device_bindings (device_id, tenant_id, patient_id, bed, "
                         "bound_at, bound_by) SELECT %s, coalesce(department_id, tenant_id), "
                         "%s, 'bed', %s, 'bench' FROM devices WHERE id = %s",
                         (device, patient, lo - dt.timedelta(hours=1), device))
        conn.execute("ANALYZE")
        say(f"  built in {time.monotonic() - start:.1f} s")
    return World("bi-h1", hospital, wards, devices, monitors, patients)


async def logins(cfg: Config, dsn: str, world: World) -> dict[str, str]:
    keys = Keyring.load(cfg.keyring_dir)
    tokens = {}
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for user in ("bench-admin", "bench-clinician"):
            await identity.create_user(conn, user, PASSWORD, world.hospital, must_change=False)
            result = await identity.login(conn, cfg.security, keys, user, PASSWORD, "", "bench",
                                          lambda _: False)
            tokens[user] = result.token
    return tokens


# -- the HL7 load (its own process) ------------------------------------------------------

def oru_messages(code: str, devices: list[int], count: int) -> list[bytes]:
    now = time.time()
    out = []
    for i in range(count):
        device = devices[i % len(devices)]
        when = time.strftime("%Y%m%d%H%M%S", time.gmtime(now - 3600 + i * 0.1)) + \
            f".{int((now * 10 + i) % 10)}+0000"
        text = "\r".join([
            f"MSH|^~\\&|GW|{code}|RMIOT|REGION|{when}||ORU^R01^ORU_R01|B{i}|P|2.6",
            "PID|||P1^^^H^MR||Test^Patient",
            f"OBR|1|||182777000^monitoring^SCT|||{when}",
            f"OBX|1|NM|8867-4^Heart rate^LN||{60 + i % 40}|/min^/min^UCUM|||||F|||{when}||||"
            f"{device}",
            f"OBX|2|NM|150456^MDC_PULS_OXIM_SAT_O2^MDC||{94 + i % 6}|262688^MDC_DIM_PERCENT^MDC"
            f"|||||F|||{when}||||{device}",
            f"OBX|3|NM|151562^MDC_RESP_RATE^MDC||{12 + i % 8}|/min^/min^UCUM|||||F|||{when}||||"
            f"{device}",
            f"OBX|4|NM|8310-5^Body temperature^LN||36.{i % 10}|Cel^Cel^UCUM|||||F|||{when}||||"
            f"{device}"]) + "\r"
        out.append(START + text.encode() + END)
    return out


async def _stream(port: int, messages: list[bytes]) -> tuple[int, int]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    ok = bad = 0
    window = asyncio.Semaphore(WINDOW)

    async def read() -> None:
        nonlocal ok, bad
        for _ in messages:
            data = await reader.readuntil(END)
            if b"MSA|AA|" in data:
                ok += 1
            else:
                bad += 1
            window.release()

    reading = asyncio.create_task(read())
    for sent, m in enumerate(messages, 1):
        await window.acquire()
        writer.write(m)
        if sent % 50 == 0:
            await writer.drain()
    await writer.drain()
    await reading
    writer.close()
    return ok, bad


def load_process(port: int, code: str, devices: list[int], count: int,
                 out: Any) -> None:
    messages = oru_messages(code, devices, count)
    chunks = [messages[i::CONNECTIONS] for i in range(CONNECTIONS)]

    async def run() -> tuple[int, int, float]:
        start = time.perf_counter()
        results = await asyncio.gather(*(_stream(port, c) for c in chunks))
        return sum(r[0] for r in results), sum(r[1] for r in results), \
            time.perf_counter() - start

    out.send(uvloop.run(run()))


async def hl7_figures(cfg: Config, world: World) -> dict[str, Any]:
    security = SecurityServices(cfg)
    await security.start()
    ingest = IngestService(cfg)
    await ingest.start()
    listener = Hl7Listener(cfg, ingest.pipeline, security.authorizer, security.audit,
                           security.keyring)
    port = await listener.start()
    try:
        say(f"hl7: {MESSAGES} ORU^R01 over {CONNECTIONS} MLLP connections ...")
        here, there = multiprocessing.Pipe()
        proc = multiprocessing.get_context("spawn").Process(
            target=load_process, args=(port, world.code, world.devices, MESSAGES, there))
        cpu0 = cpu_s(os.getpid())
        proc.start()
        ok, bad, seconds = await asyncio.to_thread(here.recv)
        proc.join()
        cpu = cpu_s(os.getpid()) - cpu0
    finally:
        await listener.stop()
        await ingest.stop()
        await security.stop()
    with psycopg.connect(db.app_dsn(cfg), autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM telemetry WHERE device_id = ANY(%s)",
                           (world.devices,)).fetchone()
    stored = int(row[0]) if row else 0
    rate = ok / seconds if seconds else 0.0
    say(f"  {ok} AA, {bad} other in {seconds:.2f} s: {rate:,.0f} messages/s; "
        f"{stored} frames stored; platform process CPU {cpu:.1f} s")
    return {"hl7_oru_msgs_per_s": round(rate, 1), "hl7_oru_acked_ok": ok,
            "hl7_oru_not_ok": bad, "hl7_frames_stored": stored,
            "hl7_platform_cpu_s_per_1k_msgs": round(cpu / max(ok, 1) * 1000, 3)}


# -- FHIR searches --------------------------------------------------------------------

def search_process(base: str, tokens: dict[str, str], patients: list[int], bound: list[int],
                   out: Any) -> None:
    """``CLIENTS`` searching at once for ``SEARCH_SECONDS``, in a process of their own
    (their JSON parsing is no part of the server's time); sends back the latencies."""
    now = dt.datetime.now(dt.UTC)
    rng = random.Random(11)
    latencies: dict[str, list[float]] = {"by_patient_code_day": [], "by_device_day": [],
                                         "by_patient": []}
    entries = 0

    def query(kind: str) -> tuple[str, str]:
        day = (now - dt.timedelta(hours=rng.uniform(24, 24 * DAYS))).strftime("%Y-%m-%dT%H:%M:%SZ")
        k = rng.randrange(len(patients))
        if kind == "by_patient_code_day":
            return "bench-clinician", (f"/Observation?patient={patients[k]}"
                                       f"&code=http://loinc.org|8867-4&date=ge{day}")
        if kind == "by_device_day":
            end = (dt.datetime.fromisoformat(day.replace("Z", "+00:00"))
                   + dt.timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
            return "bench-admin", (f"/Observation?device={bound[k]}&date=ge{day}"
                                   f"&date=lt{end}&_count=100")
        return "bench-admin", f"/Observation?patient={patients[k]}&_count=100"

    async def run() -> None:
        nonlocal entries
        async with aiohttp.ClientSession() as http:
            async def client() -> None:
                nonlocal entries
                stop = time.monotonic() + SEARCH_SECONDS
                while time.monotonic() < stop:
                    kind = rng.choice(list(latencies))
                    user, path = query(kind)
                    start = time.perf_counter()
                    async with http.get(base + path, headers={
                            "Authorization": f"Bearer {tokens[user]}"}) as resp:
                        body = await resp.read()
                        assert resp.status == 200, (resp.status, body[:300])
                    latencies[kind].append((time.perf_counter() - start) * 1000)
                    entries += len(json.loads(body).get("entry", ()))

            await asyncio.gather(*(client() for _ in range(CLIENTS)))

    uvloop.run(run())
    out.send((latencies, entries))


async def fhir_figures(cfg: Config, world: World, tokens: dict[str, str]) -> dict[str, Any]:
    security = SecurityServices(cfg)
    await security.start()
    api = FhirApi(cfg, security)
    port = await api.start()
    base = f"http://127.0.0.1:{port}/fhir"
    try:
        say(f"fhir: Observation searches, {CLIENTS} clients (own process) for "
            f"{SEARCH_SECONDS:.0f} s ...")
        here, there = multiprocessing.Pipe()
        proc = multiprocessing.get_context("spawn").Process(
            target=search_process, args=(base, tokens, world.patients, world.monitors[::4],
                                         there))
        cpu0 = cpu_s(os.getpid())
        proc.start()
        latencies, entries = await asyncio.to_thread(here.recv)
        proc.join()
        cpu = cpu_s(os.getpid()) - cpu0
    finally:
        await api.stop()
        await security.stop()
    everything = sorted(v for vs in latencies.values() for v in vs)
    out: dict[str, Any] = {
        "fhir_observation_search_p99_ms": round(pct(everything, 0.99), 2),
        "fhir_observation_search_p50_ms": round(pct(everything, 0.50), 2),
        "fhir_searches": len(everything),
        "fhir_searches_per_s": round(len(everything) / SEARCH_SECONDS, 1),
        "fhir_observations_returned": entries,
        "fhir_server_cpu_ms_per_search": round(cpu / max(len(everything), 1) * 1000, 2)}
    for kind, values in latencies.items():
        out[f"fhir_{kind}_p99_ms"] = round(pct(sorted(values), 0.99), 2)
    say(f"  {len(everything)} searches, p50 {out['fhir_observation_search_p50_ms']} ms, "
        f"p99 {out['fhir_observation_search_p99_ms']} ms")
    return out


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    cfg, dsn, _ = fresh_database(DATABASE)
    keys = cfg.data_dir / "bench-keys" / DATABASE
    shutil.rmtree(keys, ignore_errors=True)  # patients' key files of an earlier run
    cfg = dataclasses.replace(
        cfg,
        ingest=dataclasses.replace(cfg.ingest, tcp_port=0, device_rate_per_s=1e6),
        security=dataclasses.replace(cfg.security, keyring_dir=str(keys),
                                     caller_rate_per_s=1e6, tenant_rate_per_s=1e6,
                                     audit_checkpoints=str(keys / "checkpoints.jsonl")),
        hl7=dataclasses.replace(cfg.hl7, enabled=True, port=0, max_in_flight=WINDOW * 2),
        fhir=dataclasses.replace(cfg.fhir, enabled=True, port=0))
    world = build(cfg, dsn)
    tokens = asyncio.run(logins(cfg, dsn, world))
    figures = uvloop.run(hl7_figures(cfg, world))
    figures.update(uvloop.run(fhir_figures(cfg, world, tokens)))
    figures["goals_met"] = (figures["hl7_oru_msgs_per_s"] >= GOALS["hl7_oru_msgs_per_s"]
                            and figures["fhir_observation_search_p99_ms"]
                            <= GOALS["fhir_observation_search_p99_ms"])
    figures["dataset"] = {"monitors": MONITORS, "days": DAYS, "frames": MONITORS * DAYS * 1440,
                          "patients": len(world.patients), "own": True}
    figures["load_avg_1m"] = round(os.getloadavg()[0], 2)
    figures["cores"] = os.cpu_count()
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
