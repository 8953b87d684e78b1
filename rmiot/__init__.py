"""rmiot — a regional medical IoT platform (T/GDIOT 009-2024).

The subpackages map the repository's top-level folders (see DESIGN.md):
``rmiot.ingest``, ``rmiot.core_ext``, ``rmiot.registry``, ``rmiot.tenants``,
``rmiot.query``, ``rmiot.security``, ``rmiot.proto`` and ``rmiot.deploy``.
This root package holds only the glue every part shares: configuration
(``rmiot.config``), logging (``rmiot.logs``), database access (``rmiot.db``),
the gRPC server conventions (``rmiot.grpc_server``) and the ``rmiot`` command.
"""

__version__ = "0.1.0"
