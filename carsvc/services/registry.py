"""RegistryService: named agent specs and the connected workers."""

from __future__ import annotations

from typing import Any

import grpc

from carsvc._proto.car.v1 import registry_pb2, registry_pb2_grpc
from carsvc.domain.convert import worker_to_proto
from carsvc.domain.errors import InvalidArgument
from carsvc.domain.registry import AgentRegistry
from carsvc.domain.specs import Limits, check_spec_bounds
from carsvc.domain.workers import Dispatcher
from carsvc.services.errors import unary


class RegistryService(registry_pb2_grpc.RegistryServiceServicer):
    def __init__(self, registry: AgentRegistry, dispatcher: Dispatcher, limits: Limits | None = None) -> None:
        self.registry = registry
        self.dispatcher = dispatcher
        self.limits = limits or Limits()

    @unary
    async def RegisterAgent(
        self, request: registry_pb2.RegisterAgentRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> registry_pb2.RegisterAgentResponse:
        if not request.HasField("agent"):
            raise InvalidArgument("is required", field="agent")
        check_spec_bounds(request.agent, "agent", self.limits)
        stored = self.registry.register(request.agent, replace=request.replace)
        return registry_pb2.RegisterAgentResponse(agent=stored)

    @unary
    async def GetAgent(
        self, request: registry_pb2.GetAgentRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> registry_pb2.GetAgentResponse:
        return registry_pb2.GetAgentResponse(agent=self.registry.get(request.name))

    @unary
    async def ListAgents(
        self, request: registry_pb2.ListAgentsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> registry_pb2.ListAgentsResponse:
        return registry_pb2.ListAgentsResponse(agents=self.registry.list())

    @unary
    async def UnregisterAgent(
        self, request: registry_pb2.UnregisterAgentRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> registry_pb2.UnregisterAgentResponse:
        if not request.name:
            raise InvalidArgument("must not be empty", field="name")
        return registry_pb2.UnregisterAgentResponse(existed=self.registry.unregister(request.name))

    @unary
    async def ListWorkers(
        self, request: registry_pb2.ListWorkersRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> registry_pb2.ListWorkersResponse:
        workers = [
            worker_to_proto(s)
            for s in sorted(self.dispatcher.sessions.values(), key=lambda s: (s.worker_id, s.session_id))
        ]
        return registry_pb2.ListWorkersResponse(workers=workers)
