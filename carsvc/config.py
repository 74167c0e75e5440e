"""Sidecar settings: defaults, overridden by CARSVC_* environment variables,
overridden by command-line flags. No grpc imports."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from carsvc.domain.bounds import DEFAULT_MAX_VALUE_DEPTH, MAX_VALUE_DEPTH_LIMIT

ENV_PREFIX = "CARSVC_"
# gRPC's default receive limit in every language is 4 MiB; one field or agent
# output must fit in it with room for the envelope around it.
MAX_INLINE_BYTES = 3 * 1024 * 1024


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _parse_bool(raw: str) -> bool:
    word = raw.strip().lower()
    if word in _TRUE or word in _FALSE:
        return word in _TRUE
    raise ValueError(raw)


@dataclass(frozen=True, slots=True)
class Settings:
    """Every field can be set by the environment variable CARSVC_<FIELD> (upper case)."""

    # Where to listen. Loopback by default: expose it on purpose.
    host: str = "127.0.0.1"
    port: int = 50051
    log_level: str = "INFO"
    # "text" for people, "json" (one object per line, with run_id, assignment_id,
    # worker_id fields where they apply) for log pipelines.
    log_format: str = "text"
    # Keep state, run records and events in <data_dir>/carsvc.sqlite3 so a restart
    # recovers them; empty keeps everything in memory only.
    data_dir: str = ""
    # Durability (docs/operations.md, "Durability"). The journal commits what it
    # holds within journal_flush_ms of its being written, under any load (a
    # SIGKILL loses at most that much); producers wait when it lags.
    # journal_sync: "normal" (commits not fsynced), "full" (each commit
    # fsynced: survives power loss), "strict" (fsynced, and every
    # acknowledgement -- state Set/Delete, StartRun, a reported run end --
    # waits for the commit holding it: nothing acknowledged is ever lost).
    journal_flush_ms: int = 50
    journal_sync: str = "normal"
    # With a journal, runs still active when the sidecar stops (or crashes) resume
    # after the restart (StartRunRequest.resume overrides it per run).
    resume_runs: bool = True
    # Prometheus metrics at http://<metrics_host>:<metrics_port>/metrics; 0 turns them off.
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    # Largest gRPC message accepted or sent, in bytes.
    max_message_bytes: int = 16 * 1024 * 1024
    # Largest single text or value field (a task, an item, a state value), in bytes.
    max_field_bytes: int = 1024 * 1024
    # Deepest JSON nesting of any value (state, outputs, events, metadata,
    # decisions); 3 x depth + envelopes stays under protobuf's 100-level parse
    # limit, so whatever is stored can be re-sent and decoded (at most 28).
    max_value_depth: int = DEFAULT_MAX_VALUE_DEPTH
    # Largest AgentOutput a worker may return (an answer with its outcome), in bytes.
    max_output_bytes: int = 1024 * 1024
    # A run result larger than this (serialized) is not sent inline by GetRun,
    # ListRuns, run_finished or Submit; clients read it with ReadRunResult.
    max_inline_result_bytes: int = 1024 * 1024
    # Keys one state scope may hold (a write of a new key past it is RESOURCE_EXHAUSTED).
    max_state_keys: int = 10_000
    # State scopes held at once. A scope goes when it has no keys and no active
    # run or watcher; a generated thread's scope goes with its last retained run.
    max_state_scopes: int = 100_000
    # Largest map-reduce item list and agents per pattern.
    max_items: int = 100_000
    max_agents_per_pattern: int = 1_000
    # Workers must send a frame at least this often; three missed intervals end
    # the session and its assignments go to other workers.
    heartbeat_interval_ms: int = 5_000
    heartbeat_misses: int = 3
    # Assignment attempts before an agent's output carries the error.
    max_attempts: int = 3
    # How long an assignment waits for a worker that serves its agent to connect.
    unplaced_timeout_s: float = 30.0
    # How long a cancelled assignment holds its worker slot without an answer.
    cancel_ack_timeout_s: float = 10.0
    # Events retained per run (older ones are dropped; replay starts later).
    event_retention: int = 10_000
    # Finished runs kept for GetRun/ListRuns.
    finished_run_retention: int = 10_000
    # Events a watcher may fall behind before it is ended (RESOURCE_EXHAUSTED).
    watcher_buffer: int = 4_096
    # Bytes of events a watcher (WatchRun, Session, ReadEvents with follow,
    # StateService.Watch) may fall behind before it is ended RESOURCE_EXHAUSTED
    # with the seq to resume from; a single larger event is always sent.
    watcher_max_bytes: int = 64 * 1024 * 1024
    # Runs waiting behind an active run on one thread (on_busy = ENQUEUE).
    max_queued_per_thread: int = 16
    mailbox_depth: int = 1_024
    mailbox_recv_timeout_s: float = 30.0
    # The deadline of an agent whose spec sets no metadata.timeout_secs: past it the
    # assignment is cancelled on its worker and the output says timed out. 0: none.
    agent_timeout_s: float = 3600.0
    # Watchers (WatchRun, Session, ReadEvents with follow) one run may have at once.
    max_watchers_per_run: int = 1_000
    # How long a suspended tool call waits for a decision before it is cancelled.
    suspension_timeout_s: float = 3600.0
    # Decisions kept per run for tool calls that have not suspended yet.
    max_unmatched_decisions: int = 256
    # On SIGTERM/SIGINT: how long in-flight runs get to finish.
    shutdown_grace_s: float = 10.0
    # Authentication (docs/configuration.md, "Authentication and TLS"): bearer
    # tokens per scope, from files (one token per line, # comments) and/or the
    # comma-separated CARSVC_WORKER_TOKENS / CARSVC_CLIENT_TOKENS. No token at all:
    # auth is off. The token values are secrets: never in repr, never a flag.
    worker_tokens_file: str = ""
    client_tokens_file: str = ""
    worker_tokens: str = field(default="", repr=False)
    client_tokens: str = field(default="", repr=False)
    # TLS: the server's certificate chain and key (PEM files); with a client CA
    # every client must present a certificate it signed (mutual TLS).
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    # Strangers and broken peers (SECURITY.md, "What a stranger can make the
    # sidecar hold"): a call's first request message must arrive whole within
    # receive_timeout_s of the call's start (0: no deadline); at most
    # max_streams_per_connection calls at once on one HTTP/2 connection; every
    # keepalive_time_s the sidecar pings a connection and closes it when no
    # answer comes within keepalive_timeout_s (0: no pings).
    receive_timeout_s: float = 30.0
    max_streams_per_connection: int = 1_000
    keepalive_time_s: float = 60.0
    keepalive_timeout_s: float = 20.0
    # Metrics over HTTPS (docs/operations.md, "Metrics"): the endpoint's PEM
    # certificate chain and key; with a client CA, scrapers must present a
    # certificate it signed. metrics_tls "grpc" reuses tls_cert_file,
    # tls_key_file and tls_client_ca_file; "off" (default) serves plain HTTP
    # unless metrics_tls_cert_file is set.
    metrics_tls: str = "off"
    metrics_tls_cert_file: str = ""
    metrics_tls_key_file: str = ""
    metrics_tls_client_ca_file: str = ""

    @property
    def heartbeat_timeout_s(self) -> float:
        return self.heartbeat_interval_ms * self.heartbeat_misses / 1000

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then CARSVC_* variables, then `overrides` (None values ignored)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is None:
                continue
            kind = type(getattr(cls(), f.name))
            try:
                values[f.name] = _parse_bool(raw) if kind is bool else kind(raw)
            except ValueError:
                raise ValueError(
                    f"{ENV_PREFIX}{f.name.upper()}={raw!r} is not a valid {kind.__name__}"
                ) from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        positive = (
            "max_message_bytes", "max_field_bytes", "max_items", "max_agents_per_pattern",
            "heartbeat_interval_ms", "heartbeat_misses", "max_attempts", "event_retention",
            "finished_run_retention", "watcher_buffer", "mailbox_depth", "max_unmatched_decisions",
            "watcher_max_bytes",
            "max_watchers_per_run", "max_value_depth", "max_output_bytes",
            "max_inline_result_bytes", "max_state_keys", "max_state_scopes",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}")
        for name in ("port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"{name} must be within 0..65535, not {getattr(self, name)}")
        if self.log_format not in ("text", "json"):
            raise ValueError(f"log_format must be 'text' or 'json', not {self.log_format!r}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError(f"log_level must be DEBUG, INFO, WARNING, ERROR or CRITICAL, not {self.log_level!r}")
        if self.journal_sync not in ("normal", "full", "strict"):
            raise ValueError(f"journal_sync must be 'normal', 'full' or 'strict', not {self.journal_sync!r}")
        if self.journal_flush_ms <= 0:
            raise ValueError(f"journal_flush_ms must be positive, not {self.journal_flush_ms}")
        if self.max_value_depth > MAX_VALUE_DEPTH_LIMIT:
            raise ValueError(
                f"max_value_depth must be at most {MAX_VALUE_DEPTH_LIMIT} (protobuf's parse limit), "
                f"not {self.max_value_depth}"
            )
        for name in ("max_field_bytes", "max_output_bytes", "max_inline_result_bytes"):
            if getattr(self, name) > MAX_INLINE_BYTES:
                raise ValueError(
                    f"{name} must be at most {MAX_INLINE_BYTES} (what fits a client's default 4 MiB "
                    f"message with its envelope), not {getattr(self, name)}"
                )
        if self.max_field_bytes > self.max_message_bytes:
            raise ValueError("max_field_bytes must not exceed max_message_bytes")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        # Strangers, broken peers, metrics over HTTPS.
        for name in ("receive_timeout_s", "keepalive_time_s", "keepalive_timeout_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, not {getattr(self, name)}")
        if self.max_streams_per_connection <= 0:
            raise ValueError(f"max_streams_per_connection must be positive, not {self.max_streams_per_connection}")
        if self.metrics_tls not in ("off", "grpc"):
            raise ValueError(f"metrics_tls must be 'off' or 'grpc', not {self.metrics_tls!r}")
        if self.metrics_tls == "grpc" and not self.tls_cert_file:
            raise ValueError("metrics_tls 'grpc' reuses the gRPC port's TLS files: set tls_cert_file and tls_key_file")
        if self.metrics_tls == "grpc" and self.metrics_tls_cert_file:
            raise ValueError("metrics_tls 'grpc' and metrics_tls_cert_file exclude each other: pick one")
        if bool(self.metrics_tls_cert_file) != bool(self.metrics_tls_key_file):
            raise ValueError("metrics_tls_cert_file and metrics_tls_key_file must be set together")
        if self.metrics_tls_client_ca_file and not self.metrics_tls_cert_file:
            raise ValueError("metrics_tls_client_ca_file needs metrics_tls_cert_file and metrics_tls_key_file")
