"""Interleaved timing: every round runs each step once, in rotating order.

A ratio between two providers should compare like with like. On a shared machine the speed
drifts over seconds (other jobs, clocks, caches), so timing provider A for ten seconds and then
B for ten makes A/B partly a measure of the drift. Here round i times A, B, C, then round i+1
B, C, A, and so on: all providers see the same phases, and a per-round ratio (``stats.paired_ratio``)
cancels them.

Rounds: a planned number from the time budget (``RoundPolicy.planned``), then more while any
step's spread (IQR / median) is above the target, up to ``max_rounds`` or twice the budget.
Rows still above the target after that are marked noisy by the report.

GPU: a step's round is K back-to-back calls between two ``torch.cuda.synchronize()`` (K from
``iterations_for``, so a round lasts ~2 ms), as a model issues them: launches overlap kernels.
CPU: one call per round.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .stats import NOISY_SPREAD, quartiles


@dataclass(frozen=True)
class RoundPolicy:
    min_rounds: int
    max_rounds: int
    budget_s: float  # the timed rounds of the whole group, before any extension
    target_spread: float = NOISY_SPREAD

    def planned(self, round_estimate_s: float) -> int:
        """Rounds that fit the budget, within [min_rounds, max_rounds]."""
        if round_estimate_s <= 0:
            return self.max_rounds
        return max(self.min_rounds, min(self.max_rounds, int(self.budget_s / round_estimate_s)))

    def more(self, times: dict[str, list[float]], planned: int, elapsed_s: float) -> bool:
        """Whether to time another round: until ``planned``, then while a step is noisy and
        neither ``max_rounds`` nor twice the budget is reached."""
        rounds = min((len(v) for v in times.values()), default=0)
        if rounds < max(planned, self.min_rounds):
            return True
        if rounds >= self.max_rounds or elapsed_s >= 2 * self.budget_s:
            return False
        return any(spread(v) > self.target_spread for v in times.values())


def policy_for(device: torch.device, quick: bool, steps: int) -> RoundPolicy:
    """Round limits and budget for a group of ``steps`` providers."""
    if quick:
        return RoundPolicy(2, 5, 0.3 * steps)
    if device.type == "cuda":
        return RoundPolicy(10, 200, 0.3 * steps)
    return RoundPolicy(3, 15, 2.0 * steps)


def spread(times: list[float]) -> float:
    """IQR / median of one step's round times (0 for fewer than two rounds)."""
    if len(times) < 2:
        return 0.0
    q1, med, q3 = quartiles(times)
    return (q3 - q1) / med if med > 0 else 0.0


def iterations_for(estimate_s: float, round_s: float = 2e-3, most: int = 1000) -> int:
    """Calls per round on a GPU: enough that a round lasts ~``round_s`` (launch gaps and the
    clock's synchronisation amortised), at least one."""
    if estimate_s <= 0:
        return most
    return max(1, min(most, round(round_s / estimate_s)))


def rotation(names: list[str], round_index: int) -> list[str]:
    """The order of round ``round_index``: ``names`` rotated by the round number."""
    if not names:
        return []
    k = round_index % len(names)
    return names[k:] + names[:k]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_round(fn: Callable[[], Any], iterations: int, device: torch.device) -> float:
    """Seconds per call over ``iterations`` back-to-back calls, synchronised at both ends."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iterations):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / iterations


def time_interleaved(
    steps: dict[str, Callable[[], Any]],
    iterations: dict[str, int],
    estimates: dict[str, float],
    device: torch.device,
    policy: RoundPolicy,
) -> dict[str, list[float]]:
    """Per-call seconds of every round of every step, rounds interleaved (see the module doc)."""
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    planned = policy.planned(sum(estimates[n] * iterations[n] for n in names))
    start = time.perf_counter()
    r = 0
    while names and policy.more(times, planned, time.perf_counter() - start):
        for name in rotation(names, r):
            times[name].append(time_round(steps[name], iterations[name], device))
        r += 1
    return times
