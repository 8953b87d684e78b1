"""Query: the tiered gRPC QueryService, the platform's rollups and retention,
and de-identified regional views."""
