"""carsvc: a gRPC sidecar for multi-agent coordination.

Servers: `carsvc serve` (or carsvc.server.Sidecar). Workers: carsvc.worker.
Clients: carsvc.client. The contract: proto/car/v1.
"""

from carsvc._version import __version__

__all__ = ["__version__"]
