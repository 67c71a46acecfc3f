"""The restart policy serve and the worker pool share (launch/restart.py): pure, on a virtual clock."""

from __future__ import annotations

from llamalaunch.launch.restart import Restart, RestartPolicy, Restarts


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def crash_loop(restarts: Restarts, clock: Clock, up_s: float, times: int) -> list[Restart]:
    """`times` deaths, each after the child was up `up_s`."""
    found = []
    for _ in range(times):
        restarts.up()
        clock.now += up_s
        found.append(restarts.died())
    return found


def test_the_delay_doubles_to_the_cap() -> None:
    policy = RestartPolicy(backoff_initial_s=0.5, backoff_max_s=5.0, quiet_s=60.0)
    assert [policy.delay_s(streak) for streak in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]


def test_past_max_restarts_it_gives_up_and_counts_nothing_more() -> None:
    clock = Clock()
    restarts = Restarts(RestartPolicy(1.0, 30.0, 600.0, max_restarts=2), clock)
    assert crash_loop(restarts, clock, 1.0, 3) == [Restart(1, 1.0), Restart(2, 2.0), Restart(3, None)]
    assert (restarts.streak, restarts.total) == (2, 2)


def test_without_a_limit_it_never_gives_up() -> None:
    clock = Clock()
    found = crash_loop(Restarts(RestartPolicy(1.0, 4.0, 600.0), clock), clock, 1.0, 50)
    assert found[-1] == Restart(50, 4.0)


def test_up_the_quiet_period_starts_the_streak_again() -> None:
    """serve: ten minutes ready forgives the restarts before (the count and the delay start again)."""
    clock = Clock()
    restarts = Restarts(RestartPolicy(1.0, 30.0, 600.0, max_restarts=2), clock)
    assert crash_loop(restarts, clock, 599.0, 2) == [Restart(1, 1.0), Restart(2, 2.0)]
    assert crash_loop(restarts, clock, 600.0, 1) == [Restart(1, 1.0)]
    assert (restarts.streak, restarts.total) == (1, 3)


def test_counting_all_the_quiet_period_resets_only_the_delay() -> None:
    """worker: --max-restarts counts every restart; a minute up only starts the backoff again."""
    clock = Clock()
    restarts = Restarts(RestartPolicy(1.0, 30.0, 60.0, max_restarts=3, limit_counts_all=True), clock)
    assert crash_loop(restarts, clock, 1.0, 2) == [Restart(1, 1.0), Restart(2, 2.0)]
    assert crash_loop(restarts, clock, 60.0, 2) == [Restart(3, 1.0), Restart(4, None)]
    assert restarts.total == 3


def test_a_death_before_it_was_up_is_not_quiet() -> None:
    """serve: a child that died while loading (never ready) does not start the streak again, however long
    ago the one before it was ready; each death ends the up time it was judged by."""
    clock = Clock()
    restarts = Restarts(RestartPolicy(1.0, 30.0, 600.0), clock)
    restarts.up()
    clock.now += 1.0
    assert restarts.died() == Restart(1, 1.0)
    clock.now += 10_000.0  # no up() since: a long load, or a worker that is not back
    assert restarts.died() == Restart(2, 2.0)
