"""What `carsvc runs watch` shows: a run folded from its events (status, one row per
agent with the progress its worker reported, waiting tool calls, budget), drawn as
a live view with rich, or one plain line per event when stdout is not a terminal."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from carsvc._proto.car.v1 import events_pb2, runs_pb2, types_pb2
from carsvc.commands.base import budget_text, shorten, status_name, value_text
from carsvc.values import from_value

RUNNING_STATES = ("started", "waiting")
BAR_WIDTH = 24


@dataclass
class AgentRow:
    """One agent of the run, from its agent_started event on."""

    order: int
    name: str
    role: str
    index: int
    step: str
    assignment_id: str = ""
    state: str = "started"  # started, waiting, done, failed, cancelled, skipped
    fraction: float | None = None
    message: str = ""
    attempt: int = 1
    worker_id: str = ""
    ended_seq: int = 0


@dataclass
class RunView:
    """A run as its events tell it; `apply` each event in seq order."""

    run_id: str
    pattern: str = ""
    thread_id: str = ""
    owner: str = ""
    status: int = types_pb2.RUN_STATUS_UNSPECIFIED
    status_reason: str = ""
    created_ms: int = 0
    budget: types_pb2.BudgetSnapshot | None = None
    agents: dict[str, AgentRow] = field(default_factory=dict)
    skipped: list[AgentRow] = field(default_factory=list)
    waiting: dict[str, events_pb2.ToolCallSuspended] = field(default_factory=dict)
    finished: events_pb2.RunFinished | None = None
    last_seq: int = 0
    last_event_ms: int = 0

    @classmethod
    def of(cls, run: runs_pb2.Run) -> RunView:
        return cls(
            run_id=run.run_id,
            pattern=run.pattern,
            thread_id=run.thread_id,
            owner=run.agent_id,
            status=run.status,
            created_ms=run.created_unix_ms,
        )

    @property
    def rows(self) -> list[AgentRow]:
        return sorted([*self.agents.values(), *self.skipped], key=lambda row: row.order)

    def apply(self, event: events_pb2.RunEvent) -> None:
        self.last_seq = event.seq
        self.last_event_ms = event.time_unix_ms
        kind = event.WhichOneof("kind")
        if kind == "run_started":
            e = event.run_started
            self.pattern, self.thread_id, self.owner = e.pattern, e.thread_id, e.agent_id
            self.status = types_pb2.RUN_STATUS_RUNNING
        elif kind == "status_changed":
            self.status, self.status_reason = event.status_changed.status, event.status_changed.reason
        elif kind == "agent_started":
            s = event.agent_started
            self.agents[s.assignment_id] = AgentRow(
                len(self.agents) + len(self.skipped), s.agent, s.role, s.index, s.step, s.assignment_id
            )
        elif kind == "agent_redispatched":
            row = self.agents.get(event.agent_redispatched.assignment_id)
            if row is not None:
                row.attempt, row.fraction = event.agent_redispatched.attempt, None
                row.message = f"attempt {row.attempt}: {event.agent_redispatched.reason}"
        elif kind == "progress":
            p = event.progress
            row = self.agents.get(p.assignment_id)
            if row is not None:
                row.message = p.message
                if p.HasField("fraction"):
                    row.fraction = p.fraction
        elif kind == "agent_finished":
            self._finish(event.agent_finished, event.seq)
        elif kind == "agent_skipped":
            skipped = event.agent_skipped
            order = len(self.agents) + len(self.skipped)
            self.skipped.append(
                AgentRow(
                    order, skipped.output.name, skipped.role, skipped.index, "", state="skipped",
                    message=skipped.output.error, ended_seq=event.seq,
                )
            )
        elif kind == "budget_updated":
            self.budget = event.budget_updated.budget
        elif kind == "tool_call_suspended":
            call = event.tool_call_suspended
            self.waiting[call.tool_call_id] = call
            row = self.agents.get(call.assignment_id)
            if row is not None:
                row.state = "waiting"
        elif kind == "tool_call_resumed":
            answered = self.waiting.pop(event.tool_call_resumed.tool_call_id, None)
            row = self.agents.get(answered.assignment_id) if answered is not None else None
            if row is not None and row.state == "waiting":
                row.state = "started"
        elif kind == "run_finished":
            self.finished = event.run_finished
            self.status = event.run_finished.status
            self.budget = event.run_finished.budget
            self.waiting.clear()

    def _finish(self, f: events_pb2.AgentFinished, seq: int) -> None:
        row = self.agents.get(f.assignment_id)
        if row is None:
            return
        out = f.output
        row.worker_id, row.attempt, row.ended_seq = f.worker_id, f.attempt or row.attempt, seq
        if out.HasField("error"):
            row.state = "cancelled" if out.error.startswith("cancelled") else "failed"
            row.message = out.error
        else:
            row.state, row.fraction = "done", 1.0
            row.message = out.answer

    # -- plain lines ------------------------------------------------------------------

    def line(self, event: events_pb2.RunEvent) -> str:
        """One line for `event` (apply it first), as printed when stdout is not a terminal."""
        kind = event.WhichOneof("kind") or "event"
        text = f"#{event.seq} {kind}"
        detail = self._detail(event, kind)
        return f"{text} {detail}" if detail else text

    def _detail(self, event: events_pb2.RunEvent, kind: str) -> str:
        if kind == "run_started":
            started = event.run_started
            owner = f" owner {started.agent_id}" if started.agent_id else ""
            return f"{started.pattern} thread {started.thread_id}{owner}"
        if kind == "status_changed":
            return f"{status_name(event.status_changed.status)}: {event.status_changed.reason}"
        if kind == "agent_started":
            agent = event.agent_started
            where = f"{agent.role} {agent.index}, {agent.step}" if agent.step else f"{agent.role} {agent.index}"
            return f"{agent.agent} ({where})"
        if kind == "agent_redispatched":
            again = event.agent_redispatched
            return f"{again.agent} attempt {again.attempt}: {again.reason}"
        if kind == "progress":
            progress = event.progress
            share = f" {progress.fraction:.0%}" if progress.HasField("fraction") else ""
            return f"{progress.agent}{share} {shorten(progress.message, 100)}".rstrip()
        if kind == "agent_finished":
            done = event.agent_finished
            if done.output.HasField("error"):
                return f"{done.output.name} failed on {done.worker_id or '-'}: {shorten(done.output.error, 100)}"
            return f"{done.output.name} ok on {done.worker_id}: {shorten(done.output.answer, 100)}"
        if kind == "agent_skipped":
            return f"{event.agent_skipped.output.name}: {shorten(event.agent_skipped.output.error, 100)}"
        if kind == "budget_updated":
            return budget_text(event.budget_updated.budget)
        if kind == "custom":
            custom = event.custom
            return f"{custom.agent} {custom.kind} {shorten(value_text(from_value(custom.payload)), 100)}"
        if kind == "tool_call_suspended":
            call = event.tool_call_suspended
            arguments = shorten(value_text(from_value(call.arguments)), 100)
            why = call.reason or "no reason"
            hint = f"carsvc approve {self.run_id} {call.tool_call_id}"
            return f"{call.agent} {call.tool_call_id} {call.tool_name} {arguments} ({why}): {hint}"
        if kind == "tool_call_resumed":
            decision = event.tool_call_resumed.decision
            verb = "approved" if decision.action == types_pb2.DECISION_ACTION_RESUME else "denied"
            reason = f": {decision.reason}" if decision.reason else ""
            return f"{event.tool_call_resumed.tool_call_id} {verb}{reason}"
        if kind == "run_finished":
            end = event.run_finished
            return f"{status_name(end.status).upper()} {end.reason}" + (f": {end.detail}" if end.detail else "")
        return ""

    # -- the live view ------------------------------------------------------------------

    def render(self, height: int = 40, now_ms: int | None = None) -> Any:
        """The live view as a rich renderable, at most about `height` lines."""
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
        header = Text.assemble(
            ("run ", "dim"), (self.run_id, "bold"), "  ", (self.pattern or "?", "cyan"), "  ",
            (status_name(self.status).upper(), _STATUS_STYLE.get(self.status, "")),
        )
        if self.thread_id:
            header.append(f"  thread {self.thread_id}", "dim")
        if self.owner:
            header.append(f"  owner {self.owner}", "dim")
        end_ms = self.last_event_ms if self.finished is not None else now_ms
        if self.created_ms:
            header.append(f"  {max(0, end_ms - self.created_ms) / 1000:.1f}s", "dim")

        shown, hidden = self._visible(max(3, height - 8 - len(self.waiting)))
        table = Table(box=None, pad_edge=False, show_edge=False, expand=False)
        for name, justify in (("agent", "left"), ("step", "left"), ("progress", "left"), ("", "right"), ("", "left")):
            table.add_column(name, justify=justify, no_wrap=True, style="dim" if name == "step" else None)  # type: ignore[arg-type]
        for row in shown:
            running = row.state in RUNNING_STATES
            style = _ROW_STYLE.get(row.state, "blue")
            share = f"{row.fraction:.0%}" if row.fraction is not None and running else row.state
            table.add_row(
                row.name, row.step or row.role, Text(bar(row, now_ms), style), Text(share, style),
                shorten(row.message, 60),
            )
        parts: list[Any] = [header, table]
        if hidden:
            parts.append(Text(hidden, "dim"))
        for call in self.waiting.values():
            arguments = shorten(value_text(from_value(call.arguments)), 50)
            parts.append(
                Text.assemble(
                    ("waiting ", "yellow bold"), f"{call.agent}: {call.tool_name} {arguments}  ",
                    (f"carsvc approve {self.run_id} {call.tool_call_id}", "bold"),
                )
            )
        if self.budget is not None:
            parts.append(Text.assemble(("budget ", "dim"), budget_text(self.budget)))
        if self.finished is not None:
            f = self.finished
            parts.append(
                Text.assemble(
                    (status_name(f.status).upper(), _STATUS_STYLE.get(f.status, "")),
                    f" {f.reason}" + (f": {shorten(f.detail, 100)}" if f.detail else ""),
                )
            )
        return Group(*parts)

    def _visible(self, room: int) -> tuple[list[AgentRow], str]:
        """The rows that fit in `room` lines (running ones first, then the latest
        to end), and a line counting the rest."""
        rows = self.rows
        if len(rows) <= room:
            return rows, ""
        running = [r for r in rows if r.state in RUNNING_STATES]
        ended = sorted((r for r in rows if r.state not in RUNNING_STATES), key=lambda r: r.ended_seq)
        keep = running[:room]
        keep += ended[len(ended) - (room - len(keep)) :] if room > len(keep) else []
        kept = {id(r) for r in keep}
        counts: dict[str, int] = {}
        for r in rows:
            if id(r) not in kept:
                counts[r.state] = counts.get(r.state, 0) + 1
        more = " · ".join(f"{n} {state}" for state, n in sorted(counts.items()))
        return sorted(keep, key=lambda r: r.order), f"… and {len(rows) - len(keep)} more ({more})"


def bar(row: AgentRow, now_ms: int, width: int = BAR_WIDTH) -> str:
    """A progress bar that reads without colour: the reported share of `row`
    filled; a block sliding along while it runs without one (still while it
    waits for a decision); full once it ended."""
    if row.state not in RUNNING_STATES:
        return ("█" if row.state == "done" else "▒") * width
    if row.fraction is None and row.state == "waiting":
        return "░" * width
    if row.fraction is None:
        at = now_ms // 125 % width
        return "".join("▒" if abs(i - at) < 2 else "░" for i in range(width))
    filled = round(max(0.0, min(1.0, row.fraction)) * width)
    return "█" * filled + "░" * (width - filled)


_STATUS_STYLE: dict[int, str] = {
    types_pb2.RUN_STATUS_PENDING: "dim",
    types_pb2.RUN_STATUS_RUNNING: "blue bold",
    types_pb2.RUN_STATUS_WAITING: "yellow bold",
    types_pb2.RUN_STATUS_SUCCEEDED: "green bold",
    types_pb2.RUN_STATUS_FAILED: "red bold",
    types_pb2.RUN_STATUS_CANCELLED: "magenta bold",
}
_ROW_STYLE = {"done": "green", "failed": "red", "cancelled": "magenta", "skipped": "dim", "waiting": "yellow"}
