"""The libraries the pipeline's steps import lazily, imported ahead by a process that forks task processes.

A Celery worker forks one process per task instance, and every training task imported
scikit-learn, MLflow, skops and pyarrow again in its fresh process: measured on the
distributed mode's two workers (bench/distributed_training.py), a ``train_candidate`` task spent
26 s of its 42 s importing at load 12 on 2 cores, three times over when the mapped candidates
ran side by side, against well under a second of reading its features. Imported once in the
worker before it forks (``scripts/distributed/celery_config.py``), the task processes inherit
them. ``tasks`` comes first, so its thread settings (``tasks/__init__.py``) hold when the
numerical libraries load; nothing here runs a thread pool (a fork after OpenMP ran is unsafe).
"""

from __future__ import annotations

import importlib
import logging
import time

log = logging.getLogger(__name__)

# What the training DAG's steps and the drift step import inside their functions.
MODULES = (
    "tasks",
    "pandas",
    "pyarrow.parquet",
    "boto3",
    "sklearn.compose",
    "sklearn.ensemble",
    "sklearn.linear_model",
    "sklearn.metrics",
    "sklearn.model_selection",
    "sklearn.pipeline",
    "scipy.optimize",
    "skops.io",
    "mlflow",
    "mlflow.sklearn",
    "mlflow.models",
    "tasks.ingest",
    "tasks.transform",
    "tasks.train",
    "tasks.evaluate",
    "tasks.registry",
)


def preload(modules: tuple[str, ...] = MODULES) -> dict[str, float]:
    """Import ``modules`` in order; the seconds each took (0 for one already imported).

    Raises:
        ImportError: One is not installed (the message names it): the worker's environment
            lacks what its tasks need, better found at its start than in a task.
    """
    seconds = {}
    for name in modules:
        started = time.perf_counter()
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ImportError(
                f"preload: cannot import {name} ({err}); install requirements.txt in this environment"
            ) from err
        seconds[name] = time.perf_counter() - started
    log.info("preloaded %d modules in %.1fs", len(seconds), sum(seconds.values()))
    return seconds
