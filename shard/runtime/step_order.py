"""Keeps pipelined step calls in the router's order.

The router sends step N+1 while step N still computes, so that the model thread
goes from one step to the next without waiting for a round trip. Two calls in
flight on one connection are handled by separate tasks, which may reach the model
thread in either order; a call naming its predecessor (``after_step_id``) waits
here until that predecessor has been handed to the model thread. The model thread
is one thread running its queue in order, so hand-over order is run order.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from shard.runtime.errors import CapacityError

#: How many handed-over step ids are remembered (a follower names the step just before it).
REMEMBERED_STEPS = 1024
#: How long a call waits for its predecessor: far beyond any arrival skew; a predecessor
#: this late was lost with its connection, and the router will have failed the step anyway.
DEFAULT_WAIT_S = 30.0


class StepOrder:
    def __init__(self, wait_s: float = DEFAULT_WAIT_S):
        self.wait_s = wait_s
        self._handed: OrderedDict[int, None] = OrderedDict()
        self._waiting: dict[int, asyncio.Future[None]] = {}

    async def after(self, step_id: int) -> None:
        """Returns once step ``step_id`` was handed over (at once for 0 or a step already seen)."""
        if step_id == 0 or step_id in self._handed:
            return
        arrival = self._waiting.get(step_id)
        if arrival is None:
            arrival = self._waiting[step_id] = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(asyncio.shield(arrival), self.wait_s)
        except TimeoutError:
            self._waiting.pop(step_id, None)
            late = f"step {step_id}, which this call must follow, did not arrive within {self.wait_s:.0f}s"
            raise CapacityError(late) from None

    def handed(self, step_id: int) -> None:
        """Step ``step_id`` is on the model thread's queue (or failed before it): its followers may go."""
        if step_id == 0:
            return
        self._handed[step_id] = None
        while len(self._handed) > REMEMBERED_STEPS:
            self._handed.popitem(last=False)
        arrival = self._waiting.pop(step_id, None)
        if arrival is not None and not arrival.done():
            arrival.set_result(None)
