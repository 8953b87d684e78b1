"""Configuration: one TOML file plus ``RMIOT_*`` environment overrides.

The file is optional; every key has a default, documented in
``deploy/rmiot.example.toml``. Which file is read: ``--config PATH``, else
``$RMIOT_CONFIG``, else ``rmiot.toml`` in the working directory if present.

Environment overrides are ``RMIOT_<SECTION>_<KEY>`` (``RMIOT_GRPC_PORT=6000``),
plus two short forms: ``RMIOT_DSN`` (``database.dsn``, an external TimescaleDB)
and ``RMIOT_MQTT_URL`` (``broker.url``, an external broker).

Every mistake — an unknown section or key, a value of the wrong type or out of
range — raises :class:`ConfigError` whose message names the key and where the
value came from; start-up prints that one line and exits, never a traceback.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
import zoneinfo
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(Exception):
    """A configuration mistake; the message names the key and its source."""


@dataclass(frozen=True)
class PlatformConfig:
    role: str = "region"
    name: str = "rmiot"
    data_dir: str = ".var"

    def check(self) -> None:
        _one_of("platform.role", self.role, ("region", "hospital"))


@dataclass(frozen=True)
class DatabaseConfig:
    dsn: str = ""
    admin_dsn: str = ""
    host: str = "127.0.0.1"
    port: int = 54329
    name: str = "rmiot"
    pool_min: int = 2
    pool_max: int = 16
    connect_timeout_s: float = 5.0
    shared_buffers: str = "2GB"
    replica_port: int = 54330
    replica_sync: bool = True
    read_dsn: str = ""

    def check(self) -> None:
        _port("database.port", self.port)
        _port("database.replica_port", self.replica_port)
        _at_least("database.pool_min", self.pool_min, 0)
        _at_least("database.pool_max", self.pool_max, max(1, self.pool_min))
        _at_least("database.connect_timeout_s", self.connect_timeout_s, 0.1)

    @property
    def private(self) -> bool:
        """True when the platform runs its own cluster under ``data_dir``."""
        return not self.dsn


@dataclass(frozen=True)
class BrokerConfig:
    url: str = ""
    host: str = "127.0.0.1"
    port: int = 18830
    # The platform's own login on the broker (ingest reads every device's topics).
    platform_user: str = "rmiot-platform"
    platform_password_file: str = ""

    def check(self) -> None:
        _port("broker.port", self.port)
        if not self.platform_user.startswith("rmiot-"):  # devices' logins cannot start so
            raise ConfigError(f"broker.platform_user must start with rmiot-, got "
                              f"{self.platform_user!r}")
        if self.url and not self.url.startswith(("mqtt://", "mqtts://")):
            raise ConfigError(f"broker.url must start with mqtt:// or mqtts://, got {self.url!r}")

    @property
    def private(self) -> bool:
        return not self.url


@dataclass(frozen=True)
class GrpcConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    mtls_port: int = 50052
    tls: bool = True
    max_workers: int = 16

    def check(self) -> None:
        _port("grpc.port", self.port)
        _port("grpc.mtls_port", self.mtls_port)
        _at_least("grpc.max_workers", self.max_workers, 1)


@dataclass(frozen=True)
class TlsConfig:
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""

    def check(self) -> None:
        pass


@dataclass(frozen=True)
class IngestConfig:
    tcp_host: str = "127.0.0.1"
    tcp_port: int = 7700
    processes: int = 0
    writers: int = 2
    batch_max_rows: int = 4000
    batch_max_ms: int = 20
    max_connections: int = 20000
    idle_timeout_s: float = 300.0
    partial_frame_timeout_s: float = 5.0
    past_window_s: int = 7 * 24 * 3600
    future_window_s: int = 300
    device_rate_per_s: float = 200.0
    tenant_points_per_s: float = 2_000_000.0

    def check(self) -> None:
        _port("ingest.tcp_port", self.tcp_port)
        _at_least("ingest.writers", self.writers, 1)
        _at_least("ingest.processes", self.processes, 0)
        _at_least("ingest.batch_max_rows", self.batch_max_rows, 1)
        _at_least("ingest.batch_max_ms", self.batch_max_ms, 1)
        _at_least("ingest.max_connections", self.max_connections, 1)
        _at_least("ingest.device_rate_per_s", self.device_rate_per_s, 0.1)
        _at_least("ingest.tenant_points_per_s", self.tenant_points_per_s, 1)


@dataclass(frozen=True)
class UplinkConfig:
    """The hospital role's forwarding to the region (rmiot.ingest.uplink)."""

    target: str = ""
    client_cert: str = ""
    client_key: str = ""
    ca_file: str = ""
    tenants: str = ""
    metrics: str = ""
    kinds: str = ""
    batch_frames: int = 5000
    streams: int = 4
    timeout_s: float = 30.0
    retry_max_s: float = 10.0
    hold_s: float = 60.0
    backlog_alarm_s: float = 600.0

    def check(self) -> None:
        if self.target:
            host, _, port = self.target.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) <= 65535:
                raise ConfigError(f"uplink.target must be host:port, got {self.target!r}")
        for key in ("tenants", "metrics", "kinds"):
            value = getattr(self, key)
            if not all(part.strip().isdigit() for part in value.split(",") if part.strip()):
                raise ConfigError(f"uplink.{key} must be a comma-separated list of ids, "
                                  f"got {value!r}")
        _at_least("uplink.batch_frames", self.batch_frames, 1)
        _at_least("uplink.streams", self.streams, 1)
        _at_least("uplink.timeout_s", self.timeout_s, 0.1)
        _at_least("uplink.retry_max_s", self.retry_max_s, 0.1)
        _at_least("uplink.hold_s", self.hold_s, 0.1)
        _at_least("uplink.backlog_alarm_s", self.backlog_alarm_s, 1)

    def ids(self, key: str) -> frozenset[int]:
        """``tenants``, ``metrics`` or ``kinds`` as a set (empty: no filter)."""
        return frozenset(int(p) for p in getattr(self, key).split(",") if p.strip())


@dataclass(frozen=True)
class MqttConfig:
    """The MQTT device adapter (rmiot.ingest.mqtt) on the broker of [broker]."""

    enabled: bool = False
    topic_root: str = "rmiot"
    share_group: str = "rmiot"
    receive_maximum: int = 64

    def check(self) -> None:
        for key in ("topic_root", "share_group"):
            value = getattr(self, key)
            if not value or any(c in value for c in "/+#$ ") or len(value) > 64:
                raise ConfigError(f"mqtt.{key} must be one topic level without / + # $ "
                                  f"or spaces, got {value!r}")
        _at_least("mqtt.receive_maximum", self.receive_maximum, 1)
        if self.receive_maximum > 65535:
            raise ConfigError(f"mqtt.receive_maximum must be at most 65535, "
                              f"got {self.receive_maximum}")


@dataclass(frozen=True)
class CoapConfig:
    """The CoAP device adapter (rmiot.ingest.coap), UDP."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 5683
    max_body_bytes: int = 65536
    answer_timeout_s: float = 20.0

    def check(self) -> None:
        _port("coap.port", self.port)
        _at_least("coap.max_body_bytes", self.max_body_bytes, 64)
        _at_least("coap.answer_timeout_s", self.answer_timeout_s, 0.1)


@dataclass(frozen=True)
class HttpConfig:
    """The HTTP device adapter (rmiot.ingest.http)."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 7780
    tls: bool = False
    max_body_bytes: int = 1048576
    answer_timeout_s: float = 20.0

    def check(self) -> None:
        _port("http.port", self.port)
        _at_least("http.max_body_bytes", self.max_body_bytes, 64)
        _at_least("http.answer_timeout_s", self.answer_timeout_s, 0.1)


@dataclass(frozen=True)
class Hl7Config:
    """HL7 v2 inbound over MLLP (rmiot.ingest.hl7)."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 2575
    tls: bool = False
    timezone: str = "Asia/Shanghai"
    answer_timeout_s: float = 20.0
    max_message_bytes: int = 1048576
    max_in_flight: int = 256

    def check(self) -> None:
        _port("hl7.port", self.port)
        _at_least("hl7.answer_timeout_s", self.answer_timeout_s, 0.1)
        _at_least("hl7.max_message_bytes", self.max_message_bytes, 1024)
        _at_least("hl7.max_in_flight", self.max_in_flight, 1)
        try:
            zoneinfo.ZoneInfo(self.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ConfigError(f"hl7.timezone must be an IANA time zone, got "
                              f"{self.timezone!r}") from None


@dataclass(frozen=True)
class FhirConfig:
    """The FHIR R4 read API over HTTP (rmiot.query.fhir)."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 8090
    tls: bool = False
    page_max: int = 1000

    def check(self) -> None:
        _port("fhir.port", self.port)
        _at_least("fhir.page_max", self.page_max, 1)


@dataclass(frozen=True)
class DicomConfig:
    """C-ECHO of imaging equipment (rmiot.ingest.dicom_echo)."""

    enabled: bool = False
    interval_s: float = 60.0
    timeout_s: float = 5.0
    ae_title: str = "RMIOT"

    def check(self) -> None:
        _at_least("dicom.interval_s", self.interval_s, 0.1)
        _at_least("dicom.timeout_s", self.timeout_s, 0.1)
        if not 1 <= len(self.ae_title) <= 16 or not self.ae_title.isascii():
            raise ConfigError(f"dicom.ae_title must be 1-16 ASCII characters, "
                              f"got {self.ae_title!r}")


@dataclass(frozen=True)
class SecurityConfig:
    keyring_dir: str = ""
    password_max_age_days: int = 90
    lockout_attempts: int = 5
    lockout_minutes: int = 30
    session_idle_minutes: int = 15
    caller_rate_per_s: float = 200.0
    tenant_rate_per_s: float = 2000.0
    audit_checkpoints: str = ""
    audit_checkpoint_interval_s: float = 600.0
    audit_retention_days: int = 0

    def check(self) -> None:
        _at_least("security.password_max_age_days", self.password_max_age_days, 1)
        _at_least("security.lockout_attempts", self.lockout_attempts, 1)
        _at_least("security.lockout_minutes", self.lockout_minutes, 1)
        _at_least("security.session_idle_minutes", self.session_idle_minutes, 1)
        _at_least("security.caller_rate_per_s", self.caller_rate_per_s, 0.1)
        _at_least("security.tenant_rate_per_s", self.tenant_rate_per_s, 0.1)
        _at_least("security.audit_checkpoint_interval_s", self.audit_checkpoint_interval_s, 1)
        if self.audit_retention_days:  # GB/T 22239-2019: access logs kept 180 days at least
            _at_least("security.audit_retention_days", self.audit_retention_days, 180)


@dataclass(frozen=True)
class QueryConfig:
    simple_s: float = 1.0
    complex_s: float = 2.0
    batch_s: float = 3.0
    min_group_size: int = 11
    pool_max: int = 8
    batch_max_items: int = 100
    batch_parallel: int = 8
    online_within_s: int = 300
    rollup_period_s: float = 30.0
    rollup_scan_overlap_s: float = 120.0
    rollup_open_refresh_s: float = 300.0
    rollup_minute_keep_days: int = 2
    retention_period_s: float = 3600.0
    replica_max_staleness_s: float = 0.0

    def check(self) -> None:
        for key in ("simple_s", "complex_s", "batch_s"):
            _at_least(f"query.{key}", getattr(self, key), 0.01)
        _at_least("query.min_group_size", self.min_group_size, 1)
        _at_least("query.pool_max", self.pool_max, 1)
        _at_least("query.batch_max_items", self.batch_max_items, 1)
        _at_least("query.batch_parallel", self.batch_parallel, 1)
        _at_least("query.online_within_s", self.online_within_s, 1)
        _at_least("query.rollup_period_s", self.rollup_period_s, 0.1)
        # ingest.marks marks frames over 60 s late; the scan must cover the rest.
        _at_least("query.rollup_scan_overlap_s", self.rollup_scan_overlap_s, 90)
        _at_least("query.rollup_open_refresh_s", self.rollup_open_refresh_s, 0)
        _at_least("query.rollup_minute_keep_days", self.rollup_minute_keep_days, 1)
        _at_least("query.retention_period_s", self.retention_period_s, 1)
        _at_least("query.replica_max_staleness_s", self.replica_max_staleness_s, 0)


@dataclass(frozen=True)
class BackupConfig:
    dir: str = ""
    keep: int = 7
    archive_timeout_s: int = 60

    def check(self) -> None:
        _at_least("backup.keep", self.keep, 1)
        _at_least("backup.archive_timeout_s", self.archive_timeout_s, 1)


@dataclass(frozen=True)
class OtelConfig:
    """OpenTelemetry traces and metrics (rmiot.observability)."""

    exporter: str = "none"
    otlp_endpoint: str = "http://127.0.0.1:4317"
    otlp_insecure: bool = True
    sample_ratio: float = 1.0
    metric_interval_s: float = 30.0
    prometheus: bool = False
    prometheus_host: str = "127.0.0.1"
    prometheus_port: int = 9464
    service_name: str = "rmiot"

    def check(self) -> None:
        _one_of("otel.exporter", self.exporter, ("none", "console", "otlp"))
        if not 0.0 <= self.sample_ratio <= 1.0:
            raise ConfigError(f"configuration key otel.sample_ratio must be between 0 and 1, "
                              f"got {self.sample_ratio}")
        _at_least("otel.metric_interval_s", self.metric_interval_s, 0.1)
        _port("otel.prometheus_port", self.prometheus_port)


@dataclass(frozen=True)
class DashboardConfig:
    """The web dashboard (rmiot.query.dashboard)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8470
    tls: bool = False
    refresh_s: float = 3.0

    def check(self) -> None:
        _port("dashboard.port", self.port)
        _at_least("dashboard.refresh_s", self.refresh_s, 0.2)


@dataclass(frozen=True)
class OpsConfig:
    """Hospital operations' background jobs (rmiot.ops_reports, rmiot.compliance_alarms)."""

    reports_dir: str = ""
    report_pdf: bool = True
    job_period_s: float = 60.0

    def check(self) -> None:
        _at_least("ops.job_period_s", self.job_period_s, 1)


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    format: str = "auto"

    def check(self) -> None:
        _one_of("log.level", self.level, ("debug", "info", "warning", "error"))
        _one_of("log.format", self.format, ("auto", "json", "text"))


@dataclass(frozen=True)
class Config:
    platform: PlatformConfig = field(default_factory=PlatformConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    grpc: GrpcConfig = field(default_factory=GrpcConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    coap: CoapConfig = field(default_factory=CoapConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    hl7: Hl7Config = field(default_factory=Hl7Config)
    fhir: FhirConfig = field(default_factory=FhirConfig)
    dicom: DicomConfig = field(default_factory=DicomConfig)
    uplink: UplinkConfig = field(default_factory=UplinkConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    query: QueryConfig = field(default_factory=QueryConfig)
    backup: BackupConfig = field(default_factory=BackupConfig)
    otel: OtelConfig = field(default_factory=OtelConfig)
    dashboard: DashboardConfig = field(default_factory=DashboardConfig)
    ops: OpsConfig = field(default_factory=OpsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    source: str = "defaults"

    @property
    def data_dir(self) -> Path:
        """Local state (cluster, broker, certificates); relative paths are
        taken from the repository root so every command agrees on it."""
        path = Path(self.platform.data_dir)
        return path if path.is_absolute() else REPO_ROOT / path

    @property
    def keyring_dir(self) -> Path:
        """Key-encryption keys (SM4) for secrets at rest."""
        if self.security.keyring_dir:
            return Path(self.security.keyring_dir)
        return self.data_dir / "keys"

    @property
    def audit_checkpoints(self) -> Path:
        """The audit chain's checkpoint file: one per database, kept outside it."""
        if self.security.audit_checkpoints:
            return Path(self.security.audit_checkpoints)
        where = self.database.name if self.database.private else \
            "".join(c if c.isalnum() else "_" for c in self.database.dsn)[:80]
        return self.data_dir / "audit" / f"{where}.checkpoints.jsonl"

    def tls_path(self, key: str) -> Path:
        """The configured TLS file, or the dev CA's file under ``data_dir``."""
        value = getattr(self.tls, key)
        if value:
            return Path(value)
        default = {"ca_file": "ca.crt", "cert_file": "server.crt", "key_file": "server.key"}
        return self.data_dir / "certs" / default[key]


SHORT_ENV = {"RMIOT_DSN": ("database", "dsn"), "RMIOT_MQTT_URL": ("broker", "url")}
# RMIOT_* variables that are not configuration keys (they steer tools, not the platform).
OTHER_ENV = {"RMIOT_CONFIG", "RMIOT_PURE", "RMIOT_NO_EXT", "RMIOT_SPEC_DIR",
             "RMIOT_HYPOTHESIS_PROFILE", "RMIOT_TEST_KEEP", "RMIOT_TEST_DATABASE"}


def load(path: str | os.PathLike[str] | None = None,
         environ: typing.Mapping[str, str] | None = None) -> Config:
    """Read the file (if any), apply environment overrides, validate."""
    env = os.environ if environ is None else environ
    raw: dict[str, dict[str, tuple[Any, str]]] = {}
    source = "defaults"
    chosen = path or env.get("RMIOT_CONFIG")
    if chosen is None and Path("rmiot.toml").is_file():
        chosen = "rmiot.toml"
    if chosen:
        source = str(chosen)
        for section, values in _read_toml(Path(chosen)).items():
            if not isinstance(values, dict):
                raise ConfigError(f"{section!r} in {source} must be a [section] table")
            for key, value in values.items():
                raw.setdefault(section, {})[key] = (value, source)
    for name, value in env.items():
        where = _env_target(name)
        if where is not None:
            raw.setdefault(where[0], {})[where[1]] = (value, f"environment {name}")
    return _build(raw, source)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from None


def _env_target(name: str) -> tuple[str, str] | None:
    if name in SHORT_ENV:
        return SHORT_ENV[name]
    if not name.startswith("RMIOT_") or name in OTHER_ENV:
        return None
    rest = name[len("RMIOT_"):].lower()
    for section in _sections():
        if rest.startswith(section + "_"):
            return section, rest[len(section) + 1:]
    raise ConfigError(f"environment variable {name} names no configuration key "
                      f"(sections: {', '.join(_sections())})")


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config) if f.name != "source"}


def _build(raw: dict[str, dict[str, tuple[Any, str]]], source: str) -> Config:
    sections = _sections()
    built: dict[str, Any] = {}
    for section, values in raw.items():
        if section not in sections:
            where = next(iter(values.values()))[1]
            raise ConfigError(f"unknown configuration section [{section}] in {where} "
                              f"(known: {', '.join(sections)})")
    for section, cls in sections.items():
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, (value, where) in raw.get(section, {}).items():
            if key not in known:
                raise ConfigError(f"unknown configuration key {section}.{key} in {where} "
                                  f"(known in [{section}]: {', '.join(sorted(known))})")
            kwargs[key] = _coerce(f"{section}.{key}", value, hints[key], where)
        obj = cls(**kwargs)
        obj.check()
        built[section] = obj
    return Config(**built, source=source)


def _coerce(key: str, value: Any, kind: Any, where: str) -> Any:
    from_env = where.startswith("environment")
    if kind is bool:
        if isinstance(value, bool):
            return value
        if from_env and str(value).lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return str(value).lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"configuration key {key} must be true or false, got {value!r} ({where})")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_env:
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"configuration key {key} must be an integer, got {value!r} ({where})")
    if kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if from_env:
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"configuration key {key} must be a number, got {value!r} ({where})")
    if kind is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"configuration key {key} must be a string, got {value!r} ({where})")
    raise ConfigError(f"configuration key {key}: unsupported type {kind}")


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"configuration key {key} must be one of {', '.join(allowed)}, "
                          f"got {value!r}")


def _port(key: str, value: int) -> None:
    # 0 asks the system for a free port (tests, benchmarks); status cannot find it then.
    if not 0 <= value <= 65535:
        raise ConfigError(f"configuration key {key} must be a port number 0-65535, got {value}")


def _at_least(key: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(f"configuration key {key} must be at least {low}, got {value}")
