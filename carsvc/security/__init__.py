"""Authentication and transport security: bearer tokens per scope (worker,
client), TLS and mutual TLS, on the sidecar and in the SDK. See SECURITY.md and
docs/configuration.md ("Authentication and TLS")."""

from carsvc.security.channel import TLS, bearer_metadata, open_channel

__all__ = ["TLS", "bearer_metadata", "open_channel"]
