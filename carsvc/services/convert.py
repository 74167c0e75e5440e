"""Protobuf <-> domain conversions that more than one servicer needs."""

from __future__ import annotations

from carsvc.domain.infra import limits_from_proto

__all__ = ["limits_from_proto"]
