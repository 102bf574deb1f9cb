"""Which datasets a monitoring DAG run covers: one mapped task per onboarded dataset that is served.

A dataset is *onboarded* when its spec is in ``include/datasets/`` and *served* when its
registered model has a ``champion``: a monitor (drift, quality) has nothing to compare
before that. The drift DAG maps its check over :func:`monitored_datasets`; the quality DAG
is meant to map over the same list, so both cover the same datasets.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from tasks.config import Settings, model_name_for

log = logging.getLogger(__name__)


class NothingMonitored(ValueError):
    """No onboarded dataset has a champion: nothing is served, so there is nothing to watch."""


def monitored_datasets(
    settings: Settings,
    known: Sequence[str],
    has_champion: Callable[[str], bool],
    requested: str | None = None,
) -> list[str]:
    """The datasets one monitoring run checks, sorted by name.

    Args:
        settings: The settings (which model name each dataset has: ``tasks.config.model_name_for``).
        known: The onboarded datasets (spec names).
        has_champion: Whether a registered model has a champion (asked per model name).
        requested: One dataset named by the run (checked even without a champion, so the
            check itself says what to do); None: every onboarded dataset with a champion.

    Returns:
        Dataset names, at least one.

    Raises:
        ValueError: ``requested`` is not an onboarded dataset (the message lists them).
        NothingMonitored: None was requested and no onboarded dataset has a champion.
    """
    if requested:
        if requested not in known:
            raise ValueError(
                f"unknown dataset {requested!r}: a dataset is the name of a spec in include/datasets/ "
                f"(known: {', '.join(sorted(known))})"
            )
        return [requested]
    served = [dataset for dataset in sorted(known) if has_champion(model_name_for(settings, dataset))]
    skipped = sorted(set(known) - set(served))
    if skipped:
        log.info("not monitored (no champion yet): %s", ", ".join(skipped))
    if not served:
        names = ", ".join(model_name_for(settings, d) for d in sorted(known))
        raise NothingMonitored(
            f"no onboarded dataset has a champion (registered models {names}): nothing is served, so there is "
            "nothing to watch. Run network_security_training first (make run)."
        )
    return served


def champion_lookup(tracking_uri: str) -> Callable[[str], bool]:
    """``has_champion`` on the MLflow registry at ``tracking_uri`` (fails fast when it is down)."""
    from mlflow import MlflowClient

    from tasks.tracking import CHAMPION, alias_version, check_tracking_server

    check_tracking_server(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)

    def has_champion(model_name: str) -> bool:
        return alias_version(client, model_name, CHAMPION) is not None

    return has_champion
