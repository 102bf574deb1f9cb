"""The distributed mode's Celery config: Airflow's default, and each worker preloads the pipeline's libraries."""

from __future__ import annotations

import importlib

from scripts.distributed import config as distributed_config


def _configured(environment: dict[str, str]) -> object:
    module, _, name = environment["AIRFLOW__CELERY__CELERY_CONFIG_OPTIONS"].rpartition(".")
    return getattr(importlib.import_module(module), name)


def test_every_process_gets_airflows_celery_config_unchanged(tmp_path):
    from airflow.providers.celery.executors.default_celery import DEFAULT_CELERY_CONFIG

    config = distributed_config.Config.from_env({"NS_DIST_STATE_DIR": str(tmp_path)})
    assert _configured(distributed_config.environment(config)) == DEFAULT_CELERY_CONFIG


def test_a_starting_worker_preloads_the_task_modules(tmp_path, monkeypatch):
    from celery.signals import worker_init

    import tasks.preload

    config = distributed_config.Config.from_env({"NS_DIST_STATE_DIR": str(tmp_path)})
    _configured(distributed_config.environment(config))  # importing it connects the receiver
    calls = []
    monkeypatch.setattr(tasks.preload, "preload", lambda *args: calls.append(args) or {})
    worker_init.send(sender=None)
    assert calls == [()]
