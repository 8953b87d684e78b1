"""The hospital systems around the platform, started with it when configured:
the HL7 v2 MLLP listener (``[hl7]``), the FHIR R4 API (``[fhir]``) and the DICOM
C-ECHO poller (``[dicom]``), each off by default."""

from __future__ import annotations

from rmiot.config import Config
from rmiot.ingest.dicom_echo import DicomEcho
from rmiot.ingest.hl7.listener import Hl7Listener
from rmiot.ingest.service import IngestService
from rmiot.query.fhir.api import FhirApi
from rmiot.security.service import SecurityServices


class Interop:
    def __init__(self, cfg: Config, security: SecurityServices, ingest: IngestService) -> None:
        self.cfg = cfg
        self.hl7 = Hl7Listener(cfg, ingest.pipeline, security.authorizer, security.audit,
                               security.keyring) if cfg.hl7.enabled else None
        self.fhir = FhirApi(cfg, security) if cfg.fhir.enabled else None
        self.dicom = DicomEcho(cfg, ingest.pipeline) if cfg.dicom.enabled else None

    async def start(self) -> list[tuple[str, str, str]]:
        """Start what is enabled; (name, address, detail) of each endpoint."""
        out = []
        if self.hl7 is not None:
            port = await self.hl7.start()
            scheme = "mllp+tls" if self.cfg.hl7.tls else "mllp"
            out.append(("hl7 v2", f"{scheme}://{self.cfg.hl7.host}:{port}",
                        "ORU^R01 observations, ADT A01/A02/A03/A08"))
        if self.fhir is not None:
            port = await self.fhir.start()
            scheme = "https" if self.cfg.fhir.tls else "http"
            out.append(("fhir r4", f"{scheme}://{self.cfg.fhir.host}:{port}/fhir",
                        "Device, DeviceMetric, Observation, Patient, DocumentReference"))
        if self.dicom is not None:
            await self.dicom.start()
            out.append(("dicom echo", f"every {self.cfg.dicom.interval_s:g} s",
                        f"as {self.cfg.dicom.ae_title}"))
        return out

    async def stop(self) -> None:
        for part in (self.fhir, self.hl7, self.dicom):
            if part is not None:
                await part.stop()
