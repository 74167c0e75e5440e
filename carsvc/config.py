"""Sidecar settings: defaults, overridden by CARSVC_* environment variables,
overridden by command-line flags. No grpc imports."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from carsvc.domain.bounds import DEFAULT_MAX_VALUE_DEPTH, MAX_VALUE_DEPTH_LIMIT

ENV_PREFIX = "CARSVC_"
# CARSVC_* variables that are not sidecar settings, and what reads them;
# `carsvc serve` warns about any other CARSVC_* variable that names no setting.
OTHER_VARIABLES = {
    "CARSVC_NO_EXTENSIONS": "use the pure-Python hot paths (carsvc/_compat.py)",
    "CARSVC_TARGET": "the example programs' sidecar address (clients/)",
    "CARSVC_WORKER_TOKEN": "the example workers' token (clients/)",
    "CARSVC_CLIENT_TOKEN": "the operator commands' client token (carsvc runs ..., carsvc/commands/)",
    "CARSVC_CLIENT_TOKEN_FILE": "the operator commands' client token file",
    "CARSVC_ADDRESS": "the operator commands' sidecar address",
    "CARSVC_AGENT_ID": "the operator commands' owner agent id",
    "CARSVC_TOKEN": "a token in the SDK's examples",
    "CARSVC_DEBUG_BUILD": "a debug build of the extensions (setup.py)",
    "CARSVC_PYTHON": "the Python clients/ci.sh runs",
    "CARSVC_BUF_AGAINST": "the baseline of clients/buf-breaking.sh",
    "CARSVC_TEST_LOOP": "the tests' event loop",
    "CARSVC_CHAOS_ITEMS": "the chaos tests' size",
    "CARSVC_SCREENSHOTS": "where tests/test_console_browser.py saves the console's screenshots (docs/console)",
}
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


class SettingError(ValueError):
    """A setting's value is refused; `name` is the setting."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


def env_name(name: str) -> str:
    """The environment variable of setting `name`: CARSVC_<NAME>."""
    return ENV_PREFIX + name.upper()


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """A warning for each CARSVC_* variable that names no setting (a misspelled
    one would otherwise be ignored without a word), with the nearest setting."""
    environ = os.environ if environ is None else environ
    known = {env_name(f.name) for f in fields(Settings)}
    warnings = []
    for var in sorted(environ):
        if not var.startswith(ENV_PREFIX) or var in known or var in OTHER_VARIABLES:
            continue
        names = sorted(name.removeprefix(ENV_PREFIX) for name in known)
        close = difflib.get_close_matches(var.removeprefix(ENV_PREFIX), names, n=1, cutoff=0.75)
        hint = f"; did you mean {ENV_PREFIX}{close[0]}?" if close else "; `carsvc config` lists the settings"
        warnings.append(f"{var} is not a carsvc setting and is ignored{hint}")
    return warnings


def sources(environ: Mapping[str, str] | None = None, **overrides: Any) -> dict[str, str]:
    """Where each setting's value comes from: "default", "env CARSVC_<NAME>" or
    "command line" (an override that is not None), as Settings.from_env reads them."""
    environ = os.environ if environ is None else environ
    found = {}
    for f in fields(Settings):
        if overrides.get(f.name) is not None:
            found[f.name] = "command line"
        elif env_name(f.name) in environ:
            found[f.name] = f"env {env_name(f.name)}"
        else:
            found[f.name] = "default"
    return found


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
    # OpenTelemetry traces (docs/operations.md, "Traces"; pip install 'carsvc[otel]'):
    # "auto" traces when the standard OTEL_* variables ask for it (an exporter
    # or an OTLP endpoint), "on" always, "off" never.
    tracing: str = "auto"
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
    # Where runs, events, state, thread locks and shared budgets live: empty for
    # this process (with the journal under data_dir), or redis://HOST:PORT/DB
    # (rediss:// for TLS) to keep them in Redis (docs/operations.md, "Redis").
    backend: str = ""
    # With a shared backend: this replica's name in the cluster. A replica that
    # restarts under the same name takes its runs back at once; others take them
    # over once their leases lapse (heartbeat_timeout). Empty: HOST:PORT of this
    # machine when the port is fixed, else a random name.
    replica_id: str = ""
    # With a journal, runs still active when the sidecar stops (or crashes) resume
    # after the restart (StartRunRequest.resume overrides it per run).
    resume_runs: bool = True
    # Prometheus metrics at http://<metrics_host>:<metrics_port>/metrics; 0 turns them off.
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    # The HTTP/JSON API and web console at http://<console_host>:<console_port>/
    # (docs/console.md); 0 turns them off.
    console_port: int = 0
    console_host: str = "127.0.0.1"
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
    # How long an assignment waits for a worker that serves its agent to connect
    # (the run's events say at once that none does); 0: as long as it takes.
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
        """Defaults, then CARSVC_* variables, then `overrides` (None values ignored).
        A refused value raises SettingError naming the setting and where its
        value came from."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        defaults = cls()
        for f in fields(cls):
            raw = environ.get(env_name(f.name))
            if raw is None:
                continue
            kind = type(getattr(defaults, f.name))
            try:
                values[f.name] = _parse_bool(raw) if kind is bool else kind(raw)
            except ValueError:
                wanted = "true or false (1/0, yes/no, on/off)" if kind is bool else f"a valid {kind.__name__}"
                raise SettingError(f.name, f"{env_name(f.name)}={raw!r} is not {wanted}") from None
        given = {k: v for k, v in overrides.items() if v is not None}
        values.update(given)
        settings = cls(**values)
        try:
            settings.validate()
        except SettingError as err:
            if err.name in given:
                raise SettingError(err.name, f"{err} (from the command line)") from None
            if err.name in values:
                where = f"{env_name(err.name)}={environ[env_name(err.name)]!r}"
                raise SettingError(err.name, f"{err} ({where})") from None
            raise
        return settings

    def validate(self) -> None:
        """Raises SettingError for the first value that is refused."""
        positive = (
            "max_message_bytes", "max_field_bytes", "max_items", "max_agents_per_pattern",
            "heartbeat_interval_ms", "heartbeat_misses", "max_attempts", "event_retention",
            "finished_run_retention", "watcher_buffer", "mailbox_depth", "max_unmatched_decisions",
            "watcher_max_bytes",
            "max_watchers_per_run", "max_value_depth", "max_output_bytes",
            "max_inline_result_bytes", "max_state_keys", "max_state_scopes",
            "journal_flush_ms", "max_streams_per_connection",
        )
        # Every number is finite and not negative; for a timeout, 0 means none
        # (docs/configuration.md says which). Those that must be above 0:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if not math.isfinite(value):
                raise SettingError(f.name, f"{f.name} must be a finite number, not {value}")
            if f.name in positive and value <= 0:
                raise SettingError(f.name, f"{f.name} must be positive, not {value}")
            if value < 0:
                raise SettingError(f.name, f"{f.name} must not be negative, not {value}")
        for name in ("port", "metrics_port", "console_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise SettingError(name, f"{name} must be within 0..65535, not {getattr(self, name)}")
        self._check_choices_and_pairs()

    def _check_choices_and_pairs(self) -> None:
        if self.backend and not self.backend.startswith(("redis://", "rediss://", "unix://")):
            raise SettingError(
                "backend",
                f"backend must be empty (in memory) or a redis://, rediss:// or unix:// URL, not {self.backend!r}",
            )
        if self.backend and self.data_dir:
            raise SettingError(
                "backend", "backend and data_dir exclude each other: with Redis, runs and state are kept in Redis"
            )
        for name, choices in (
            ("log_format", ("text", "json")),
            ("journal_sync", ("normal", "full", "strict")),
            ("metrics_tls", ("off", "grpc")),
            ("tracing", ("auto", "on", "off")),
        ):
            if getattr(self, name) not in choices:
                listed = ", ".join(repr(c) for c in choices[:-1]) + f" or {choices[-1]!r}"
                raise SettingError(name, f"{name} must be {listed}, not {getattr(self, name)!r}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise SettingError(
                "log_level", f"log_level must be DEBUG, INFO, WARNING, ERROR or CRITICAL, not {self.log_level!r}"
            )
        if self.max_value_depth > MAX_VALUE_DEPTH_LIMIT:
            raise SettingError(
                "max_value_depth",
                f"max_value_depth must be at most {MAX_VALUE_DEPTH_LIMIT} (protobuf's parse limit), "
                f"not {self.max_value_depth}",
            )
        for name in ("max_field_bytes", "max_output_bytes", "max_inline_result_bytes"):
            if getattr(self, name) > MAX_INLINE_BYTES:
                raise SettingError(
                    name,
                    f"{name} must be at most {MAX_INLINE_BYTES} (what fits a client's default 4 MiB "
                    f"message with its envelope), not {getattr(self, name)}",
                )
        if self.max_field_bytes > self.max_message_bytes:
            raise SettingError("max_field_bytes", "max_field_bytes must not exceed max_message_bytes")
        # TLS, and metrics over HTTPS.
        pairs = (
            ("tls_cert_file", bool(self.tls_cert_file) != bool(self.tls_key_file),
             "tls_cert_file and tls_key_file must be set together"),
            ("tls_client_ca_file", self.tls_client_ca_file and not self.tls_cert_file,
             "tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file"),
            ("metrics_tls", self.metrics_tls == "grpc" and not self.tls_cert_file,
             "metrics_tls 'grpc' reuses the gRPC port's TLS files: set tls_cert_file and tls_key_file"),
            ("metrics_tls", self.metrics_tls == "grpc" and self.metrics_tls_cert_file,
             "metrics_tls 'grpc' and metrics_tls_cert_file exclude each other: pick one"),
            ("metrics_tls_cert_file", bool(self.metrics_tls_cert_file) != bool(self.metrics_tls_key_file),
             "metrics_tls_cert_file and metrics_tls_key_file must be set together"),
            ("metrics_tls_client_ca_file", self.metrics_tls_client_ca_file and not self.metrics_tls_cert_file,
             "metrics_tls_client_ca_file needs metrics_tls_cert_file and metrics_tls_key_file"),
        )
        for name, refused, message in pairs:
            if refused:
                raise SettingError(name, message)
