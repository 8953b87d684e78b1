"""C-ECHO against a real pynetdicom SCP started here: an imaging device with an
AE title is online while its SCP answers and down once it stops; both states
land in telemetry through the pipeline."""

from __future__ import annotations

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from rmiot.ingest.dicom_echo import DicomEcho
from rmiot.registry.imaging import set_dicom_address
from rmiot.registry.store import RegistryError
from tests.conftest import eventually, free_port
from tests.interop.conftest import Running


def states(platform: Running, device: int) -> list[float]:
    with platform.region.conn() as conn:
        rows = conn.execute("SELECT vals[1] FROM telemetry WHERE device_id = %s AND kind = 4 "
                            "AND metrics = '{304}' ORDER BY ts", (device,)).fetchall()
    return [r[0] for r in rows]


async def test_echo_feeds_online_and_offline(platform: Running) -> None:
    r = platform.region
    port = free_port()
    scp = AE(ae_title="CT01")
    scp.add_supported_context(Verification)
    server = scp.start_server(("127.0.0.1", port), block=False)
    running = True
    with r.conn() as conn:
        with pytest.raises(RegistryError):
            set_dicom_address(conn, r.ct, "BAD\\TITLE", "127.0.0.1", port)
        set_dicom_address(conn, r.ct, "CT01", "127.0.0.1", port)
    poller = DicomEcho(r.cfg, platform.ingest.pipeline)
    try:
        assert await poller.poll_once() == {r.ct: True}
        await eventually(lambda: states(platform, r.ct) == [0.0], 5, 0.05)
        server.shutdown()
        running = False
        assert await poller.poll_once() == {r.ct: False}
        await eventually(lambda: states(platform, r.ct) == [0.0, 2.0], 5, 0.05)
    finally:
        if running:
            server.shutdown()
        with r.conn() as conn:
            set_dicom_address(conn, r.ct, None)
