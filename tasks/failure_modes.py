"""How the domain errors of ``tasks/`` end a task: for good (retrying cannot help) or skipped (nothing to do).

``network_security.runtime.failures`` raises them as Airflow's exceptions; any other error is retried.
Imported inside tasks: the modules that define the errors are heavy (pandas, MLflow).
"""

from __future__ import annotations


def no_retry_errors() -> tuple[type[Exception], ...]:
    """Bad input, bad data, an unsafe model, a champion moved by another run, a stopped release: fail, no retry."""
    from tasks.batch_scoring import BatchScoringError
    from tasks.delivery import SmokeRecordsMissing
    from tasks.drift import DriftError
    from tasks.model_io import UnsafeModel
    from tasks.plan import PlanError
    from tasks.quality import QualityError
    from tasks.registry import ChampionMoved, NothingToRollBack
    from tasks.release_run import ReleaseStopped

    no_retry = (PlanError, DriftError, QualityError, BatchScoringError, NothingToRollBack, SmokeRecordsMissing)
    return (*no_retry, ChampionMoved, UnsafeModel, ReleaseStopped)


def skip_errors() -> tuple[type[Exception], ...]:
    """Nothing to do: too little data, a deploy target not selected, no release: the task skips."""
    from tasks.delivery import NothingReleased, TargetNotSelected
    from tasks.drift import NotEnoughData

    return (NotEnoughData, TargetNotSelected, NothingReleased)
