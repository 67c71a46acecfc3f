"""When a child that died starts again: serve's llama-server and each of the worker pool's ggml-rpc-servers.

The delay doubles from the first one up to a cap; a child that stayed up a quiet period before it died
starts the doubling again; past `max_restarts` the caller gives up.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class RestartPolicy:
    backoff_initial_s: float
    backoff_max_s: float
    quiet_s: float  # up this long before it died: the backoff starts again from the first delay
    max_restarts: int | None = None  # None: never give up
    # serve: the quiet period also forgives the restarts before it (a crash a week is no crash loop);
    # worker: --max-restarts counts every restart (and the restart counter is a Prometheus counter)
    limit_counts_all: bool = False

    def delay_s(self, streak: int) -> float:
        """The wait before the `streak`-th restart in a row (1, 2, …)."""
        return min(self.backoff_initial_s * 2 ** (streak - 1), self.backoff_max_s)


@dataclass(frozen=True)
class Restart:
    number: int  # the restart counted against max_restarts: "restart 2 of 5", "crashed 6 times"
    delay_s: float | None  # None: past max_restarts, give up


class Restarts:
    """One child's restarts under `policy`, its up time read from `clock`."""

    def __init__(self, policy: RestartPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.clock = clock
        self.total = 0  # every restart made
        self.streak = 0  # restarts since the child last stayed up quiet_s: the backoff's exponent
        self._up_since: float | None = None

    @property
    def counted(self) -> int:
        """The restarts that count against max_restarts."""
        return self.total if self.policy.limit_counts_all else self.streak

    def up(self) -> None:
        """The child is up (serve: ready; worker: started): its quiet period is timed from now."""
        self._up_since = self.clock()

    def died(self) -> Restart:
        """Count the restart that follows a death, or say to give up (then nothing is counted)."""
        up_since, self._up_since = self._up_since, None  # each death ends the up time it is judged by
        if up_since is not None and self.clock() - up_since >= self.policy.quiet_s:
            self.streak = 0
        number = self.counted + 1
        limit = self.policy.max_restarts
        if limit is not None and number > limit:
            return Restart(number, None)
        self.total += 1
        self.streak += 1
        return Restart(number, self.policy.delay_s(self.streak))
