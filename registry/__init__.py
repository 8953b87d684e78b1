"""Registry: device models, devices, credentials, asset lifecycle and commands,
its gRPC RegistryService, and the in-memory read view the ingest path uses."""
