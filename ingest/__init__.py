"""Ingest: transport adapters (TCP, MQTT, CoAP, HTTP, gRPC) over one shared
adapter base, the write pipeline (validate, de-duplicate, rules, batch, write,
ack) and, in the hospital role, the uplink to the region."""
