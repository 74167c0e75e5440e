"""Which replica runs which run, with several replicas on one backend.

Every replica renews a lease on each run it runs or has queued, once per
interval, in one request. A run whose lease lapsed (its replica died, or was
cut off from Redis for longer than the lease) is claimed by the first replica
that notices, which resumes it from the store as after a restart: steps whose
outputs were stored are not run again. A replica that finds another holding
one of its runs' leases stops that run without ending it."""

from __future__ import annotations

import asyncio
import logging

from carsvc.domain.backend import RunDirectory
from carsvc.domain.runs import RESUMED, Rebuild, RunManager
from carsvc.services.background import cancel_and_wait

log = logging.getLogger("carsvc.runs")


class RunOwnership:
    def __init__(
        self, runs: RunManager, directory: RunDirectory, rebuild: Rebuild, *, interval: float, lease_ms: int
    ) -> None:
        self.runs = runs
        self.directory = directory
        self.rebuild = rebuild
        self.interval = interval
        self.lease_ms = lease_ms
        self._task: asyncio.Task[None] | None = None
        self.claimed = 0  # runs taken over from other replicas (or a previous life)

    async def recover(self) -> int:
        """Takes this replica's runs from before a restart and any whose lease
        lapsed; returns how many it resumed."""
        return await self._claim()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="carsvc-run-leases")

    async def stop(self) -> None:
        await cancel_and_wait([self._task])

    async def release_parked(self) -> None:
        """After a graceful stop: the runs it parked are free for another replica."""
        await self.directory.release([r.run_id for r in self.runs.runs.values() if r.parked and not r.finished])

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self._renew()
                await self._claim()
                await self.runs.take_freed_threads()
                await self.directory.trim(self.runs.settings.finished_run_retention)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # Redis away: runs go on; leases are renewed once it is back
                log.warning("run leases could not be renewed or claimed: %s", err)

    async def _renew(self) -> None:
        for run_id in await self.directory.renew(self.runs.active_ids(), self.lease_ms):
            self.runs.let_go(run_id, "another replica holds its lease now (this one could not renew it in time)")

    async def _claim(self) -> int:
        resumed = 0
        for run_id, own in await self.directory.claimable():
            if run_id in self.runs.runs or not await self.directory.claim(run_id, self.lease_ms):
                continue
            recovered = await self.directory.load(run_id)
            if not recovered.runs:
                continue
            log.info("run %s: taken over by replica %s", run_id, self.directory.replica_id)
            taken = f"resumed by replica {self.directory.replica_id}, taken over from a replica that stopped"
            await self.runs.restore(recovered, self.rebuild, because=RESUMED if own else taken)
            resumed += 1
        self.claimed += resumed
        return resumed
