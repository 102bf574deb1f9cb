"""A model's release: one candidate version beside the baseline, how requests are routed, what each side did.

* ``shadow``: every request is answered by the baseline; the candidate scores the same
  rows afterwards, off the response path (``serving.models.ShadowWorker``), and the two
  answers are compared.
* ``canary``: a deterministic share ``weight`` of request ids goes to the candidate
  (``takes_candidate``: a hash of the id, so the same id always takes the same side, in
  every process); the rest to the baseline.

The counters (requests, 5xx, latency, score histogram per role; shadowed rows, agreement
and candidate latency) start at zero when a release starts, so a canary step is judged on
its own traffic. Fault injection (``Fault``) applies to the candidate only and exists only
when the server allows it (``FAULT_INJECTION=true``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import random
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

BASELINE, CANDIDATE, CANARY = "baseline", "candidate", "canary"
SHADOW_MODE, CANARY_MODE = "shadow", "canary"
SCORE_BINS = 10
# Latency buckets 5 % apart from 0.05 ms to about 10 minutes: percentiles within 5 %.
_BUCKET_RATIO = 1.05
_FIRST_BUCKET_SECONDS = 5e-5
_BUCKETS = 340


def takes_candidate(request_id: str, weight: float) -> bool:
    """Whether a canary of ``weight`` answers ``request_id``: the same id always gets the same answer."""
    if weight <= 0:
        return False
    if weight >= 1:
        return True
    digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < weight


class InjectedFault(RuntimeError):
    """A failure the release asked for (``fault.error_rate``), for demos and tests."""


@dataclass(frozen=True)
class Fault:
    """Faults injected into the candidate's scoring calls.

    Attributes:
        error_rate: Share of scoring calls that fail (each call of a micro-batch or batch).
        latency_ms: Delay added to every scoring call.
    """

    error_rate: float = 0.0
    latency_ms: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.error_rate <= 1 or not 0 <= self.latency_ms <= 60_000:
            raise ValueError("fault.error_rate is within [0, 1] and fault.latency_ms within [0, 60000]")

    def apply(self) -> None:
        """Sleep and/or fail as configured (called on a worker thread, before the candidate scores)."""
        if self.latency_ms:
            time.sleep(self.latency_ms / 1000)
        if self.error_rate and random.random() < self.error_rate:
            raise InjectedFault(f"injected fault (error_rate {self.error_rate:g})")


class LatencyHistogram:
    """Counts of durations in logarithmic buckets: bounded memory, percentiles within 5 %."""

    def __init__(self) -> None:
        self.counts = [0] * _BUCKETS
        self.total = 0

    def add(self, seconds: float) -> None:
        if seconds <= _FIRST_BUCKET_SECONDS:
            index = 0
        else:
            index = min(_BUCKETS - 1, int(math.log(seconds / _FIRST_BUCKET_SECONDS, _BUCKET_RATIO)) + 1)
        self.counts[index] += 1
        self.total += 1

    def percentile_ms(self, q: float) -> float | None:
        """The ``q``-th percentile in milliseconds (the upper edge of its bucket), None without samples."""
        if not self.total:
            return None
        rank = max(1, math.ceil(q / 100 * self.total))
        seen = 0
        for index, count in enumerate(self.counts):
            seen += count
            if seen >= rank:
                return round(1000 * _FIRST_BUCKET_SECONDS * _BUCKET_RATIO**index, 3)
        return None  # pragma: no cover - the counts add up to the total


@dataclass
class RoleStats:
    """What one side of a release did since the release started."""

    requests: int = 0
    errors: int = 0  # 5xx answers
    rows: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    scores: list[int] = field(default_factory=lambda: [0] * SCORE_BINS)

    def add(self, status: int, seconds: float, probabilities: Iterable[float] | np.ndarray = ()) -> None:
        self.requests += 1
        if status >= 500:
            self.errors += 1
        self.latency.add(seconds)
        values = np.asarray(probabilities, dtype=np.float64)
        if values.size:
            self.rows += int(values.size)
            bins = np.minimum((values * SCORE_BINS).astype(np.int64), SCORE_BINS - 1)
            for index, count in enumerate(np.bincount(bins, minlength=SCORE_BINS)):
                self.scores[index] += int(count)

    def report(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors_5xx": self.errors,
            "error_rate": round(self.errors / self.requests, 6) if self.requests else 0.0,
            "rows": self.rows,
            "p50_ms": self.latency.percentile_ms(50),
            "p99_ms": self.latency.percentile_ms(99),
            "score_histogram": list(self.scores),
        }


@dataclass
class ShadowStats:
    """The shadow comparison since the release started."""

    rows: int = 0
    agreed: int = 0
    skipped_rows: int = 0  # not shadowed: too many rows were waiting (SHADOW_MAX_PENDING_ROWS)
    failed_rows: int = 0  # the candidate failed on them

    def report(self, candidate: RoleStats) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "agreement_rate": round(self.agreed / self.rows, 6) if self.rows else None,
            "candidate_p99_ms": candidate.latency.percentile_ms(99),
            "skipped_rows": self.skipped_rows,
            "failed_rows": self.failed_rows,
        }


@dataclass
class Release:
    """The release of one model: its candidate, the routing and the counters since it started.

    Attributes:
        candidate: The loaded candidate (a ``serving.model_store.ModelHandle``), None once aborted or completed.
        candidate_version: Its version (kept after the release ended, for the report).
        mode: ``shadow`` or ``canary``.
        weight: Share of request ids the canary answers (0 for a shadow).
        fault: Faults injected into the candidate, or None.
        baseline_version: The baseline's version when the release started.
        state: ``running``, ``aborted`` or ``completed``.
    """

    candidate: Any
    candidate_version: str
    mode: str
    weight: float
    fault: Fault | None
    baseline_version: str | None
    state: str = "running"
    started_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    ended_at: dt.datetime | None = None
    roles: dict[str, RoleStats] = field(default_factory=lambda: {BASELINE: RoleStats(), CANDIDATE: RoleStats()})
    shadow: ShadowStats = field(default_factory=ShadowStats)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def running(self) -> bool:
        return self.state == "running" and self.candidate is not None

    def same_as(self, version: str, mode: str, weight: float, fault: Fault | None) -> bool:
        """Whether asking for this release again changes nothing (an idempotent repeat)."""
        return self.running and (self.candidate_version, self.mode, self.weight, self.fault) == (
            version,
            mode,
            weight,
            fault,
        )

    def canary_takes(self, request_id: str) -> bool:
        return self.running and self.mode == CANARY_MODE and takes_candidate(request_id, self.weight)

    def observe(self, role: str, status: int, seconds: float, probabilities: Iterable[float] | np.ndarray = ()) -> None:
        with self.lock:
            self.roles[CANDIDATE if role in (CANDIDATE, CANARY) else BASELINE].add(status, seconds, probabilities)

    def observe_shadow(
        self, rows: int, agreed: int, seconds: float, probabilities: np.ndarray | None, failed: bool
    ) -> None:
        with self.lock:
            if failed:
                self.shadow.failed_rows += rows
            else:
                self.shadow.rows += rows
                self.shadow.agreed += agreed
            self.roles[CANDIDATE].add(500 if failed else 200, seconds, () if probabilities is None else probabilities)

    def skip_shadow(self, rows: int) -> None:
        with self.lock:
            self.shadow.skipped_rows += rows

    def end(self, state: str) -> None:
        self.state, self.candidate, self.ended_at = state, None, dt.datetime.now(dt.UTC)

    def report(self) -> dict[str, Any]:
        with self.lock:
            report = {
                "state": self.state,
                "mode": self.mode,
                "weight": self.weight,
                "candidate_version": self.candidate_version,
                "baseline_version": self.baseline_version,
                "fault": None
                if self.fault is None
                else {"error_rate": self.fault.error_rate, "latency_ms": self.fault.latency_ms},
                "started_at": self.started_at.isoformat(timespec="milliseconds"),
                "ended_at": self.ended_at.isoformat(timespec="milliseconds") if self.ended_at else None,
                "roles": {role: stats.report() for role, stats in self.roles.items()},
            }
            if self.mode == SHADOW_MODE:
                report["shadow"] = self.shadow.report(self.roles[CANDIDATE])
            return report
