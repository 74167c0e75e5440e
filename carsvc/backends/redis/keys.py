"""Every key the Redis backend uses, in one place (docs/operations.md, "Redis").

All keys start with `carsvc:`; one deployment per Redis database."""

from __future__ import annotations

PREFIX = "carsvc:"

# Run records: run:<id> (a serialized car.v1.Run), ordered in RUNS by ordinal.
RUNS = PREFIX + "runs"
# The next run ordinal (INCR), shared by every replica.
ORDINAL = PREFIX + "ordinal"
# Runs that may resume (their request is kept): a set of run ids.
RESUMABLE = PREFIX + "resumable"
# State scopes that hold keys: a set of scope names.
SCOPES = PREFIX + "scopes"
# Registered agents: a hash, name -> serialized AgentSpec.
AGENTS = PREFIX + "agents"
# The pub/sub channel of state and registry changes (backends/redis/changes.py).
CHANGES = PREFIX + "changes"


def run(run_id: str) -> str:
    return f"{PREFIX}run:{run_id}"


def request(run_id: str) -> str:
    return f"{PREFIX}run:{run_id}:request"


def steps(run_id: str) -> str:
    """A hash: step key -> serialized AgentOutput."""
    return f"{PREFIX}run:{run_id}:steps"


def admitted(run_id: str) -> str:
    """A set: the run's steps a shared budget admitted (counted once, across a take-over)."""
    return f"{PREFIX}run:{run_id}:admitted"


def events(run_id: str) -> str:
    """A stream: entry id <seq>-0, field `e` -> serialized RunEvent."""
    return f"{PREFIX}run:{run_id}:events"


def scope(name: str) -> str:
    """A hash: state key -> serialized google.protobuf.Value."""
    return f"{PREFIX}scope:{name}"


def scope_writers(name: str) -> str:
    """A hash: state key -> the agent or client that wrote it last."""
    return f"{PREFIX}scope:{name}:writers"


def thread(thread_id: str) -> str:
    """The id of the run that holds the thread (one active run per thread)."""
    return f"{PREFIX}thread:{thread_id}"


def budget(budget_id: str) -> str:
    """A hash: a shared budget's limits and counters."""
    return f"{PREFIX}budget:{budget_id}"


# Replicas that announced themselves (members whose entry expired are removed
# by whoever notices).
REPLICAS = PREFIX + "replicas"


def replica(replica_id: str) -> str:
    """A hash with a PX expiry: the agents the replica's workers serve, and their capacity."""
    return f"{PREFIX}replica:{replica_id}"


def inbox(replica_id: str) -> str:
    """A stream of messages for the replica: fields f (sender), k (kind), d (data)."""
    return f"{PREFIX}inbox:{replica_id}"

# Runs that have not ended (on any replica): a set of run ids.
ACTIVE = PREFIX + "active"


def lease(run_id: str) -> str:
    """The id of the replica running the run, with a PX expiry it renews."""
    return f"{PREFIX}lease:{run_id}"
