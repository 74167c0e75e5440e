"""Several replicas as one sidecar: any run's agents on any replica's workers.

Each replica speaks the worker protocol to the others over the cluster bus
(carsvc.domain.backend.ClusterBus; Redis streams in the Redis backend):

* As an **owner** (a run runs here), every other replica whose workers serve
  agents is one worker session in this replica's dispatcher — a *peer
  session*, marked `remote`, whose capacity is the sum of that replica's
  workers' `max_in_flight`. The dispatcher places an agent on a peer session
  only when no worker connected here has a free slot. What the dispatcher
  queues for a peer session (assignments, cancels, call results) is sent to the
  peer as the same `ConnectResponse` frames a worker would get; what the peer
  sends back (results, runtime calls) is handled by the WorkerService as if a
  worker had sent it, with the same checks.
* As a **relay** (another replica's run has work for this one), it runs each
  assignment it is sent on its own workers through its own dispatcher (which
  respects each worker's `max_in_flight` and picks the least-loaded), forwards
  the agent's runtime calls to the owner and their answers back, and returns
  the output with the owner's attempt number.

A peer whose directory entry lapses (it died) loses its session here: what it
held is handed out again, as for any lost worker; a late result from it is
answered as superseded."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from carsvc._proto.car.v1 import worker_pb2
from carsvc.domain.backend import ClusterBus, Peer
from carsvc.domain.clock import now_ms
from carsvc.domain.errors import CarError, Code, Unavailable
from carsvc.domain.workers import Assignment, Dispatcher, WorkerSession, cancelled_output
from carsvc.services.background import cancel_and_wait
from carsvc.services.calls import CallHandler, ForwardedCalls
from carsvc.services.worker import WorkerService

log = logging.getLogger("carsvc.peers")

ConnectRequest = worker_pb2.ConnectRequest
ConnectResponse = worker_pb2.ConnectResponse

# Bus message kinds: work for a relay (a ConnectResponse), and what a relay
# sends its owner back (a ConnectRequest).
WORK = "work"
DONE = "done"
# A reply to a question another replica asked (PeerLinks.ask).
ANSWER = "answer"
# Forwarded calls awaiting their owner's answer, at most (the oldest are forgotten).
MAX_FORWARDED = 100_000
# How long a replica waits for another's answer.
ASK_TIMEOUT = 30.0

Handler = Callable[[bytes], Awaitable[bytes]]


class RelayedAgent(ForwardedCalls):
    """An agent this replica runs for another replica's run (the dispatcher's
    observer of its assignment here)."""

    __slots__ = ("assignment_id", "attempt", "links", "owner", "reason")

    def __init__(self, links: PeerLinks, owner: str, assignment_id: str, attempt: int) -> None:
        self.links = links
        self.owner = owner
        self.assignment_id = assignment_id
        self.attempt = attempt
        self.reason = ""

    @property
    def cancel_reason(self) -> str:
        return self.reason

    def on_assigned(self, a: Assignment) -> None:
        pass

    def on_placed(self, a: Assignment, worker_id: str) -> None:
        pass

    def on_redispatched(self, a: Assignment, reason: str, previous_worker_id: str) -> None:
        pass

    def on_unplaced(self, a: Assignment, notice: str) -> None:
        pass

    def forward(self, session: WorkerSession, call: worker_pb2.RuntimeCall) -> None:
        self.links.forward_call(self, session, call)


class PeerLinks:
    def __init__(
        self,
        bus: ClusterBus,
        dispatcher: Dispatcher,
        workers: WorkerService,
        calls: CallHandler,
        *,
        interval: float,
    ) -> None:
        self.bus = bus
        self.dispatcher = dispatcher
        self.workers = workers
        self.calls = calls
        self.interval = interval
        # Owner side: a session per peer replica, and its writer task.
        self.sessions: dict[str, WorkerSession] = {}
        self._writers: dict[str, asyncio.Task[None]] = {}
        # Relay side: what other replicas' runs have running here.
        self._relayed: dict[str, tuple[RelayedAgent, asyncio.Task[None]]] = {}
        self._forwarded: dict[str, tuple[WorkerSession, str]] = {}  # forwarded call id -> (session, its call id)
        self._call_ids = (f"{bus.replica_id}-{n:x}" for n in itertools.count(1))
        self._outgoing: dict[str, ConnectRequest] = {}
        self._tasks: list[asyncio.Task[None]] = []
        # Questions replicas ask each other (cancel a run, decide for it).
        self._handlers: dict[str, Handler] = {}
        self._asked: dict[str, asyncio.Future[bytes]] = {}
        self._ask_ids = (f"{bus.replica_id}-q{n:x}" for n in itertools.count(1))
        self._answering: set[asyncio.Task[None]] = set()

    @property
    def replica_id(self) -> str:
        return self.bus.replica_id

    async def start(self) -> None:
        await self._advertise()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._receive(), name="carsvc-peers-inbox"),
            loop.create_task(self._directory(), name="carsvc-peers-directory"),
        ]
        log.info("replica %s joined the cluster", self.replica_id)

    async def stop(self) -> None:
        # Relayed agents are left to the stop: their owners hand them out again
        # once this replica has left the directory (a cancel would answer them).
        await cancel_and_wait([*self._tasks, *self._writers.values()])
        for peer, session in list(self.sessions.items()):
            self._drop(peer, session, "this replica is stopping")
        with contextlib.suppress(Exception):
            await self.bus.leave()

    # -- the directory: who serves what ---------------------------------------------

    async def _directory(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self._advertise()
                self._update(await self.bus.peers())
            except Exception:  # Redis away: the store's writer says so; keep going
                log.debug("the cluster directory could not be read", exc_info=True)

    async def _advertise(self) -> None:
        local = [s for s in self.dispatcher.sessions.values() if not s.remote and not s.draining and not s.closed]
        agents = sorted({name for s in local for name in s.agents})
        capacity = sum(s.max_in_flight for s in local)
        await self.bus.advertise(agents, capacity, ttl_ms=int(self.interval * 3000))

    def _update(self, peers: list[Peer]) -> None:
        alive = {p.replica_id: p for p in peers if p.agents and p.capacity > 0}
        for peer, session in list(self.sessions.items()):
            if peer not in alive:
                self._drop(peer, session, f"replica {peer} is gone (its directory entry lapsed) or serves no agent")
        for peer, entry in alive.items():
            known = self.sessions.get(peer)
            if known is None:
                self._open(entry)
                continue
            known.touch()
            self.dispatcher.update_session(known, list(entry.agents), entry.capacity)

    def _open(self, peer: Peer) -> None:
        session = self.dispatcher.open_session(
            f"replica {peer.replica_id}", peer.agents, peer.capacity, {"replica": peer.replica_id}, "carsvc-replica",
            remote=True,
        )
        self.sessions[peer.replica_id] = session
        self._writers[peer.replica_id] = asyncio.get_running_loop().create_task(
            self._write(peer.replica_id, session), name=f"carsvc-peer-{peer.replica_id}"
        )

    def _drop(self, peer: str, session: WorkerSession, reason: str) -> None:
        del self.sessions[peer]
        writer = self._writers.pop(peer, None)
        if writer is not None:
            writer.cancel()
        self.calls.session_closed(session)
        self.dispatcher.close_session(session, reason)

    async def _write(self, peer: str, session: WorkerSession) -> None:
        """Sends what the dispatcher queues for a peer session, as worker frames."""
        while not session.closed:
            await session.wakeup.wait()
            session.wakeup.clear()
            for frame in self.workers.frames(session):
                self.bus.post(peer, WORK, frame.SerializeToString())

    # -- the inbox --------------------------------------------------------------------

    async def _receive(self) -> None:
        async for sender, kind, data in self.bus.receive():
            try:
                if kind == WORK:
                    self._serve(sender, ConnectResponse.FromString(data))
                elif kind == DONE:
                    self._answered(sender, ConnectRequest.FromString(data))
                elif kind == ANSWER:
                    self._reply(data)
                elif kind in self._handlers:
                    self._answer(sender, kind, data)
                else:
                    log.warning("replica %s sent a message of unknown kind %r; ignored", sender, kind[:40])
            except Exception:
                log.exception("a message from replica %s could not be handled", sender)

    def _answered(self, peer: str, frame: ConnectRequest) -> None:
        """Owner side: a relay's results and runtime calls, as a worker's frame."""
        session = self.sessions.get(peer)
        if session is None:
            log.info("results from replica %s, which holds no work of this replica's, were ignored", peer)
            return
        session.touch()
        self.workers.handle(session, frame)

    # -- questions between replicas -------------------------------------------------------

    def serve(self, kind: str, handler: Handler) -> None:
        """Answers questions of `kind` from other replicas (a CarError becomes
        the asker's error)."""
        self._handlers[kind] = handler

    async def ask(self, replica_id: str, kind: str, data: bytes) -> bytes:
        """Asks another replica; its answer, or the CarError it raised."""
        ask_id = next(self._ask_ids)
        answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._asked[ask_id] = answer
        self.bus.post(replica_id, kind, ask_id.encode() + b"\0" + data)
        try:
            async with asyncio.timeout(ASK_TIMEOUT):
                return await answer
        except TimeoutError:
            raise Unavailable(f"replica {replica_id} did not answer within {ASK_TIMEOUT:g}s; retry") from None
        finally:
            self._asked.pop(ask_id, None)

    def _answer(self, asker: str, kind: str, data: bytes) -> None:
        ask_id, _, question = data.partition(b"\0")

        async def run() -> None:
            try:
                body = b"\0" + await self._handlers[kind](question)
            except CarError as err:
                body = bytes([int(err.code)]) + err.field.encode() + b"\0" + err.detail.encode()
            self.bus.post(asker, ANSWER, ask_id + b"\0" + body)

        self.spawn(run())

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Runs `work` in the background (kept until done; failures logged)."""

        async def guarded() -> None:
            try:
                await work
            except Exception as err:
                log.warning("a message to another replica failed: %s", err)

        task = asyncio.get_running_loop().create_task(guarded())
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)

    def _reply(self, data: bytes) -> None:
        ask_id, _, body = data.partition(b"\0")
        answer = self._asked.get(ask_id.decode())
        if answer is None or answer.done():
            return
        if body[:1] == b"\0":
            answer.set_result(body[1:])
            return
        field, _, detail = body[1:].partition(b"\0")
        code = Code(body[0]) if body[0] in Code._value2member_map_ else Code.INTERNAL
        answer.set_exception(CarError(detail.decode(errors="replace"), field=field.decode(errors="replace"), code=code))

    # -- relaying another replica's work -----------------------------------------------

    def _serve(self, owner: str, frame: ConnectResponse) -> None:
        for a in frame.assignments:
            self._relay(owner, a)
        for cancel in frame.cancels:
            relayed = self._relayed.get(cancel.assignment_id)
            if relayed is not None and relayed[0].owner == owner:
                relayed[0].reason = cancel.reason or "cancelled by its run"
                relayed[1].cancel(relayed[0].reason)
        for result in frame.call_results:
            target = self._forwarded.pop(result.call_id, None)
            if target is not None and not target[0].closed:
                result.call_id = target[1]
                target[0].reply(result)
        for error in frame.errors:
            log.info("replica %s refused part of a frame: %s: %s", owner, error.field, error.message)

    def _relay(self, owner: str, a: worker_pb2.Assignment) -> None:
        running = self._relayed.get(a.assignment_id)
        if running is not None:
            # Sent again (the run moved to another owner, or the owner re-sent it):
            # the agent already running answers whoever sent it last.
            running[0].owner, running[0].attempt = owner, a.attempt
            return
        agent = RelayedAgent(self, owner, a.assignment_id, a.attempt)
        task = asyncio.get_running_loop().create_task(self._run(agent, a))
        self._relayed[a.assignment_id] = (agent, task)

    async def _run(self, agent: RelayedAgent, a: worker_pb2.Assignment) -> None:
        timeout = max((a.deadline_unix_ms - now_ms()) / 1000, 0.001) if a.deadline_unix_ms else None
        try:
            # Its own id here: if this replica takes the run over (its owner died),
            # the resumed run's dispatch of the same step must not collide with it.
            output = await self.dispatcher.execute(
                a.spec, a.task, agent=a.agent or a.spec.name, run_id=a.run_id, thread_id=a.thread_id,
                observer=agent, timeout=timeout, assignment_id=f"{a.assignment_id}@{agent.owner}",
                trace_context=dict(a.trace_context),  # the owner's step span: the worker's span is its child
            )
        except asyncio.CancelledError:
            # Cancelled by its owner: the answer acknowledges the cancel there.
            output = cancelled_output(a.spec.name, agent.reason)
        finally:
            self._relayed.pop(a.assignment_id, None)
        self._outbox(agent.owner).results.add(assignment_id=a.assignment_id, attempt=agent.attempt, output=output)

    def forward_call(self, agent: RelayedAgent, session: WorkerSession, call: worker_pb2.RuntimeCall) -> None:
        """A relayed agent's runtime call goes to its run's owner (under the
        owner's assignment id); the answer comes back to the worker that asked,
        under the call id it chose."""
        forwarded = self._outbox(agent.owner).calls.add()
        forwarded.CopyFrom(call)
        forwarded.assignment_id = agent.assignment_id
        if call.call_id:
            forwarded.call_id = next(self._call_ids)
            self._forwarded[forwarded.call_id] = (session, call.call_id)
            if len(self._forwarded) > MAX_FORWARDED:  # owners that died never answer
                del self._forwarded[next(iter(self._forwarded))]

    def _outbox(self, owner: str) -> ConnectRequest:
        """The frame collecting what goes to `owner` this turn of the loop."""
        frame = self._outgoing.get(owner)
        if frame is None:
            if not self._outgoing:
                asyncio.get_running_loop().call_soon(self._flush)
            frame = self._outgoing[owner] = ConnectRequest()
        return frame

    def _flush(self) -> None:
        outgoing, self._outgoing = self._outgoing, {}
        for owner, frame in outgoing.items():
            self.bus.post(owner, DONE, frame.SerializeToString())
