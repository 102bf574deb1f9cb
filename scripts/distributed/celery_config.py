"""The distributed mode's Celery configuration: Airflow's default, plus the pipeline's libraries preloaded in each worker.

``[celery] celery_config_options`` points here (``config.environment``). A worker imports
``tasks.preload.MODULES`` once at start (Celery's ``worker_init``, before its pool forks);
every task process it forks inherits them instead of importing scikit-learn, MLflow and
skops again (``tasks/preload.py`` has the figures). Airflow's own worker preloads its
operators and numpy the same way (``celery_import_modules``).
"""

from __future__ import annotations

from airflow.providers.celery.executors.default_celery import DEFAULT_CELERY_CONFIG
from celery.signals import worker_init

CELERY_CONFIG = dict(DEFAULT_CELERY_CONFIG)


@worker_init.connect
def preload_task_modules(**_: object) -> None:
    from tasks.preload import preload

    preload()
