"""Thin gRPC adapters: each servicer converts protobuf requests to domain calls
and domain errors to gRPC statuses, and holds no coordination logic itself."""
