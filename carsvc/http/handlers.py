"""The HTTP/JSON API (/api/v1/...): each endpoint reads its request message
from the path, the query or a JSON body, makes the same call the gRPC
servicer makes, and answers the response message as JSON (protobuf's JSON
mapping with the proto's field names). docs/console.md is the reference."""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar, cast

from aiohttp import web
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from multidict import MultiMapping

from carsvc._proto.car.v1 import budget_pb2, registry_pb2, runs_pb2, state_pb2
from carsvc.domain.bounds import check_id
from carsvc.domain.errors import DeadlineExceeded, InvalidArgument, shown
from carsvc.http.jsonio import to_json
from carsvc.http.sse import EventStream
from carsvc.services.budget import BudgetService
from carsvc.services.registry import RegistryService
from carsvc.services.runs import RunService, check_kinds
from carsvc.services.state import StateService

__all__ = ["PREFIX", "Api"]

PREFIX = "/api/v1"

_M = TypeVar("_M", bound=Message)
_S = TypeVar("_S")
_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


class _NoContext:
    """What a servicer's body gets for its gRPC context here: nothing it may use."""

    def __getattr__(self, name: str) -> NoReturn:
        raise RuntimeError(f"a servicer body served over HTTP used its gRPC context ({name})")


async def unary_body(method: Callable[[_S, _Req, Any], Awaitable[_Resp]], servicer: _S, request: _Req) -> _Resp:
    """A unary servicer method without its gRPC error wrapper
    (services/errors.unary): the body, which raises CarError itself."""
    body = inspect.unwrap(method)
    return cast(_Resp, await body(servicer, request, _NoContext()))


def reply(message: Message) -> web.Response:
    return web.Response(text=to_json(message), content_type="application/json")


_RANGES = {
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
}
_TRUE, _FALSE = frozenset({"true", "1"}), frozenset({"false", "0", ""})


def _parse_query_value(field: Any, name: str, raw: str) -> object:
    """A query parameter's value for `field` (a FieldDescriptor of a scalar)."""
    if field.type == FieldDescriptor.TYPE_STRING:
        return raw
    if field.type == FieldDescriptor.TYPE_BOOL:
        if raw.lower() in _TRUE | _FALSE:
            return raw.lower() in _TRUE
        raise InvalidArgument(f"must be true or false, not '{shown(raw, 64)}'", field=name)
    if field.type in _RANGES:
        low, high = _RANGES[field.type]
        digits = raw.removeprefix("-")
        if not (digits.isascii() and digits.isdigit() and len(digits) <= 20) or not low <= int(raw) <= high:
            raise InvalidArgument(f"must be an integer within {low}..{high}, not '{shown(raw, 64)}'", field=name)
        return int(raw)
    if field.type == FieldDescriptor.TYPE_ENUM:
        values = field.enum_type.values_by_name
        prefix = field.enum_type.values[0].name.removesuffix("UNSPECIFIED")  # RUN_STATUS_
        found = values.get(raw) or values.get(prefix + raw.upper())
        if found is None:
            names = ", ".join(v.name.removeprefix(prefix) for v in field.enum_type.values[1:])
            raise InvalidArgument(f"must be one of {names}, not '{shown(raw, 64)}'", field=name)
        return found.number
    raise AssertionError(f"{name}: a query parameter of type {field.type}")


def from_query(query: MultiMapping[str], message: _M, allowed: tuple[str, ...]) -> _M:
    """Sets `message`'s fields named in `allowed` from the query string; any
    other parameter, or one given twice, is INVALID_ARGUMENT naming it."""
    fields = message.DESCRIPTOR.fields_by_name
    for name in set(query.keys()):
        if name not in allowed:
            listed = ", ".join(allowed) or "none"
            raise InvalidArgument(f"is not a parameter of this endpoint (it takes {listed})", field=shown(name, 64))
        values = query.getall(name)
        if len(values) > 1:
            raise InvalidArgument("is given more than once", field=name)
        if name in fields:
            setattr(message, name, _parse_query_value(fields[name], name, values[0]))
    return message


class Api:
    """The endpoints, each a thin adapter over a servicer's own method."""

    def __init__(
        self,
        runs: RunService,
        state: StateService,
        budget: BudgetService,
        registry: RegistryService,
        *,
        receive_timeout: float,
    ) -> None:
        self.runs = runs
        self.state = state
        self.budget = budget
        self.registry = registry
        self.receive_timeout = receive_timeout
        self.events = EventStream(runs)

    def routes(self) -> list[web.RouteDef]:
        p = PREFIX
        return [
            web.post(f"{p}/runs", self.start_run),
            web.get(f"{p}/runs", self.list_runs, allow_head=False),
            web.get(f"{p}/runs/{{run_id}}", self.get_run, allow_head=False),
            web.post(f"{p}/runs/{{run_id}}/cancel", self.cancel_run),
            web.post(f"{p}/runs/{{run_id}}/decisions", self.submit_decisions),
            web.get(f"{p}/runs/{{run_id}}/events", self.watch_run, allow_head=False),
            web.get(f"{p}/state", self.get_state, allow_head=False),
            web.get(f"{p}/state/keys", self.list_keys, allow_head=False),
            web.get(f"{p}/budgets/{{budget_id}}", self.get_budget, allow_head=False),
            web.get(f"{p}/workers", self.list_workers, allow_head=False),
        ]

    # -- reading requests ------------------------------------------------------------------

    async def body(self, request: web.Request, message: _M) -> _M:
        """`message` filled from the request's JSON body (an object; empty is {})."""
        if request.content_type != "application/json":
            raise InvalidArgument("must be application/json (a JSON object)", field="Content-Type")
        try:
            async with asyncio.timeout(self.receive_timeout or None):
                data = await request.read()  # at most client_max_size (413 past it)
        except TimeoutError:
            raise DeadlineExceeded(
                f"did not arrive within {self.receive_timeout:g}s (receive_timeout_s)", field="body"
            ) from None
        try:
            value = json.loads(data) if data.strip() else {}
        except (ValueError, RecursionError) as err:
            raise InvalidArgument(f"is not JSON ({shown(str(err), 200)})", field="body") from None
        if not isinstance(value, dict):
            raise InvalidArgument("must be a JSON object", field="body")
        json_format.ParseDict(value, message)
        return message

    async def control(self, request: web.Request, message: _M) -> _M:
        """A cancel's or decisions' body, for the run the path names."""
        await self.body(request, message)
        for name in ("run_id", "thread_id"):
            if getattr(message, name):
                raise InvalidArgument("is given by the URL path (/runs/{run_id}/...), not the body", field=name)
        setattr(message, "run_id", run_id_of(request))  # noqa: B010 (any control message)
        return message

    # -- runs ------------------------------------------------------------------------------

    async def start_run(self, request: web.Request) -> web.Response:
        start = await self.body(request, runs_pb2.StartRunRequest())
        return reply(await self.runs.start_run(start))

    async def get_run(self, request: web.Request) -> web.Response:
        from_query(request.query, runs_pb2.GetRunRequest(), ())
        return reply(await self.runs.get_run(runs_pb2.GetRunRequest(run_id=run_id_of(request))))

    async def list_runs(self, request: web.Request) -> web.Response:
        allowed = ("thread_id", "status", "agent_id", "page_size", "page_token", "include_results", "pattern")
        listing = from_query(request.query, runs_pb2.ListRunsRequest(), allowed)
        for name in ("thread_id", "agent_id", "page_token"):
            check_id(getattr(listing, name), name)
        pattern = request.query.get("pattern", "")
        check_id(pattern, "pattern")
        return reply(await self.runs.list_runs(listing, pattern=pattern))

    async def cancel_run(self, request: web.Request) -> web.Response:
        cancel = await self.control(request, runs_pb2.CancelRunRequest())
        return reply(await self.runs.cancel_run(cancel))

    async def submit_decisions(self, request: web.Request) -> web.Response:
        decisions = await self.control(request, runs_pb2.SubmitDecisionsRequest())
        return reply(await self.runs.submit_decisions(decisions))

    async def watch_run(self, request: web.Request) -> web.StreamResponse:
        """The run's events as Server-Sent Events (sse.py)."""
        query = request.query
        after = from_query(query, runs_pb2.WatchRunRequest(), ("after_seq", "kinds", "follow")).after_seq
        resumed = request.headers.get("Last-Event-ID")
        if resumed is not None:  # a reconnecting EventSource: it wins over the URL's after_seq
            field = runs_pb2.WatchRunRequest.DESCRIPTOR.fields_by_name["after_seq"]
            after = cast(int, _parse_query_value(field, "Last-Event-ID", resumed.strip()))
        kinds = [k for k in query.get("kinds", "").split(",") if k]
        check_kinds(kinds)
        follow = query.get("follow", "true").lower()
        if follow not in _TRUE | _FALSE:
            raise InvalidArgument(f"must be true or false, not '{shown(follow, 64)}'", field="follow")
        return await self.events.stream(request, run_id_of(request), after, frozenset(kinds), follow in _TRUE)

    # -- state, budgets, workers -----------------------------------------------------------

    async def get_state(self, request: web.Request) -> web.Response:
        get = from_query(request.query, state_pb2.GetRequest(), ("scope", "key"))
        return reply(await unary_body(StateService.Get, self.state, get))

    async def list_keys(self, request: web.Request) -> web.Response:
        listing = from_query(
            request.query, state_pb2.ListKeysRequest(), ("scope", "prefix", "page_size", "page_token")
        )
        return reply(await unary_body(StateService.ListKeys, self.state, listing))

    async def get_budget(self, request: web.Request) -> web.Response:
        from_query(request.query, budget_pb2.GetBudgetRequest(), ())
        budget_id = request.match_info["budget_id"]
        check_id(budget_id, "budget_id")
        get = budget_pb2.GetBudgetRequest(budget_id=budget_id)
        return reply(await unary_body(BudgetService.GetBudget, self.budget, get))

    async def list_workers(self, request: web.Request) -> web.Response:
        from_query(request.query, registry_pb2.ListWorkersRequest(), ())
        listing = registry_pb2.ListWorkersRequest()
        return reply(await unary_body(RegistryService.ListWorkers, self.registry, listing))


def run_id_of(request: web.Request) -> str:
    run_id = request.match_info["run_id"]
    check_id(run_id, "run_id")
    return run_id
