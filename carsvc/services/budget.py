"""BudgetService: shared budgets that several runs draw on."""

from __future__ import annotations

from typing import Any

import grpc

from carsvc._proto.car.v1 import budget_pb2, budget_pb2_grpc
from carsvc.domain.bounds import MAX_ID_CHARS
from carsvc.domain.convert import limits_from_proto, snapshot_to_proto
from carsvc.domain.errors import InvalidArgument
from carsvc.domain.runs import RunManager
from carsvc.services.errors import unary


class BudgetService(budget_pb2_grpc.BudgetServiceServicer):
    def __init__(self, runs: RunManager) -> None:
        self.runs = runs

    @unary
    async def CreateBudget(
        self, request: budget_pb2.CreateBudgetRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> budget_pb2.CreateBudgetResponse:
        if len(request.budget_id) > MAX_ID_CHARS:
            raise InvalidArgument(f"is longer than {MAX_ID_CHARS} characters", field="budget_id")
        budget = await self.runs.create_budget(limits_from_proto(request.limits, "limits"), request.budget_id)
        return budget_pb2.CreateBudgetResponse(budget=snapshot_to_proto(budget.snapshot()))

    @unary
    async def GetBudget(
        self, request: budget_pb2.GetBudgetRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> budget_pb2.GetBudgetResponse:
        if not request.budget_id:
            raise InvalidArgument("must not be empty", field="budget_id")
        budget = await self.runs.budget(request.budget_id)
        return budget_pb2.GetBudgetResponse(budget=snapshot_to_proto(budget.snapshot()))
