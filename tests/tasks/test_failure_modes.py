"""Which domain errors end a task for good and which skip it (tasks/failure_modes.py), without Airflow."""

from __future__ import annotations

from tasks import failure_modes
from tasks.delivery import NothingReleased
from tasks.drift import NotEnoughData
from tasks.ingest import DataRejected
from tasks.plan import PlanError
from tasks.registry import ChampionMoved


def test_bad_input_and_a_moved_champion_fail_for_good_and_nothing_to_do_skips():
    no_retry, skip = failure_modes.no_retry_errors(), failure_modes.skip_errors()
    assert {PlanError, ChampionMoved} <= set(no_retry) and {NotEnoughData, NothingReleased} <= set(skip)
    assert not set(no_retry) & set(skip)


def test_rejected_data_and_unknown_errors_are_neither():
    classified = failure_modes.no_retry_errors() + failure_modes.skip_errors()
    assert not issubclass(DataRejected, classified) and not issubclass(RuntimeError, classified)
