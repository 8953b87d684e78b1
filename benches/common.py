"""What every benchmark shares: a fresh database of its own, so a benchmark
never touches the platform's data or another benchmark's; and the small
pieces of the device-side loads."""

from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path

from rmiot import db
from rmiot.config import Config, load
from rmiot.core_ext import ACK_OK, FLAG_ACK_REQ, encode_ack, encode_frame
from rmiot.deploy import cluster, migrate


def fresh_database(name: str) -> tuple[Config, str, bool]:
    """Drop, create and migrate database ``name`` (starting the private cluster
    if needed). Returns the configuration pointing at it, its application DSN,
    and True when the cluster was started here (the caller stops it)."""
    cfg = load()
    cfg = dataclasses.replace(cfg, database=dataclasses.replace(cfg.database, name=name))
    started = cluster.recreate_database(cfg)
    migrate.migrate(db.admin_dsn(cfg))
    return cfg, db.app_dsn(cfg), started


# -- what the device-side loads share (bench-transports and its load processes) ----

VITALS = (72.0, 98.0, 16.0, 36.7, 120.0, 80.0, 93.3, 71.0)
ACK_LEN = len(encode_ack(1, 1, 1, 0, ACK_OK))
STATUS_AT = ACK_LEN - 4 - 1  # the low byte of an ack's int32 status


def telemetry_frame(tenant: int, device: int, seq: int, ts_us: int, fields: int = 8) -> bytes:
    """A telemetry frame of ``fields`` vitals asking for an ack."""
    return encode_frame(1, tenant, device, seq, ts_us,
                        [(m + 1, 1, VITALS[m % len(VITALS)]) for m in range(fields)],
                        flags=FLAG_ACK_REQ)


def acked_ok(data: bytes) -> tuple[int, int]:
    """(OK acks, all acks) in a run of whole ACK frames, by slicing: the
    status's low byte is at a fixed offset of each (statuses are 0..9)."""
    whole = len(data) - len(data) % ACK_LEN
    return data[STATUS_AT:whole:ACK_LEN].count(0), whole // ACK_LEN


def say(msg: str) -> None:
    print(msg, flush=True)


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_s(pid: int) -> float:
    """user+sys CPU seconds of a process (0 if it is gone or not ours to read)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def postgres_cpu_s() -> float:
    """user+sys CPU seconds of the machine's PostgreSQL servers: every live
    postgres process, plus what each postmaster's exited children used (their
    time moves there when they end), so connections closing in between do
    not make the figure go down."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    found: dict[int, tuple[int, list[str]]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if "(postgres)" in text:
            fields = text.rsplit(")", 1)[1].split()
            found[int(stat.parent.name)] = (int(fields[1]), fields)
    for _, (parent, fields) in found.items():
        total += (int(fields[11]) + int(fields[12])) / tick
        if parent not in found:  # a postmaster: its reaped backends' time too
            total += (int(fields[13]) + int(fields[14])) / tick
    return total
