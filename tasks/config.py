"""Project settings: one object, built from documented defaults and overrides.

Precedence (lowest first): the defaults below, the Airflow Variable
``network_security_config`` (a JSON object, see ``airflow_settings.yaml``), then
environment variables ``NS_<FIELD>`` (e.g. ``NS_LAKE_BUCKET``). Inside a DAG the
variable is read at run time, never at parse time.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tasks.dataset_spec import PROJECT_ROOT

SETTINGS_VARIABLE = "network_security_config"
TRAINING_DAG_ID = "network_security_training"
DEPLOY_DAG_ID = "network_security_deploy"
DRIFT_DAG_ID = "network_security_drift"
QUALITY_DAG_ID = "network_security_quality"
BATCH_SCORING_DAG_ID = "network_security_batch_scoring"
AWS_CONN_ID = "aws_default"
ENV_PREFIX = "NS_"
# The dataset whose training DAG keeps the historical id (tests, `make run`, the UI's bookmarks).
DEFAULT_DATASET = "network_security"


@dataclass(frozen=True)
class Settings:
    """Run-time configuration shared by DAGs, scripts and tests.

    Attributes:
        dataset: Name of the dataset spec under ``include/datasets/``.
        raw_bucket: Landing bucket that upstream systems drop CSV files into.
        lake_bucket: Bucket for snapshots, validation results, quarantine and features.
        aws_conn_id: Airflow connection for every AWS call (its ``endpoint_url`` extra
            points at the emulator in embedded mode).
        split_seed: Seed of the stratified train/test split.
        test_size: Share of the snapshot held out for testing.
        mlflow_tracking_uri: MLflow tracking server.
        mlflow_experiment: Experiment of the training runs.
        model_name: Registered model name (aliases challenger, champion, previous_champion);
            empty means the dataset's name, so each dataset has its own champion.
        monitoring_conn_id: Airflow SQL connection of the monitoring store (promotion log, ...).
        deploy_targets: Where a promoted champion is deployed, comma-separated: ``local`` (a
            uvicorn process of the serving app, embedded mode) and/or ``ec2`` (the tagged
            fleet, through ECR and SSM); ``include/deploy.yaml`` holds the details.
        serving_conn_id: Airflow HTTP connection of the local model server (host, port, and
            the API key as password).
    """

    dataset: str = DEFAULT_DATASET
    raw_bucket: str = "network-security-raw"
    lake_bucket: str = "network-security-lake"
    aws_conn_id: str = AWS_CONN_ID
    split_seed: int = 42
    test_size: float = 0.2
    mlflow_tracking_uri: str = "http://127.0.0.1:5050"
    mlflow_experiment: str = "network_security_training"
    model_name: str = ""
    monitoring_conn_id: str = "monitoring_store"
    deploy_targets: str = "local,ec2"
    serving_conn_id: str = "serving_local"

    @classmethod
    def load(
        cls,
        overrides: Mapping[str, object] | str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Settings:
        """Build settings from defaults, an override mapping (or its JSON) and the environment.

        Args:
            overrides: The Airflow Variable's value, as a mapping or a JSON string.
            environ: Environment to read ``NS_*`` overrides from (default ``os.environ``).

        Returns:
            The merged settings.

        Raises:
            ValueError: An unknown key or a value of the wrong type; the message names it.
        """
        if isinstance(overrides, str):
            overrides = json.loads(overrides) if overrides.strip() else {}
        if not isinstance(overrides, Mapping | None):
            raise ValueError(f"Variable {SETTINGS_VARIABLE} must hold a JSON object, got {type(overrides).__name__}")
        environ = os.environ if environ is None else environ
        fields = {f.name: f for f in dataclasses.fields(cls)}
        merged: dict[str, object] = {}
        for key, value in (overrides or {}).items():
            if key not in fields:
                raise ValueError(f"unknown setting {key!r} in Variable {SETTINGS_VARIABLE}; known: {sorted(fields)}")
            merged[key] = value
        for name in fields:
            env_value = environ.get(ENV_PREFIX + name.upper())
            if env_value is not None:
                merged[name] = env_value
        typed = {}
        for key, value in merged.items():
            field_type = type(getattr(cls, key))
            try:
                typed[key] = field_type(value)
                if field_type is int and float(value) != typed[key]:
                    raise ValueError("not a whole number")
            except (TypeError, ValueError) as err:
                raise ValueError(f"setting {key!r}={value!r} is not a valid {field_type.__name__}") from err
        return cls(**typed)

    def replace(self, **changes: object) -> Settings:
        return dataclasses.replace(self, **changes)


def state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The local state folder (pid files, logs, SQLite stores, secrets): ``NS_STATE_DIR``, default ``<project>/.state``.

    The one default for the stack scripts and the local deploy target alike, so a task run from
    another working directory still finds the model server the stack started.
    """
    environ = os.environ if environ is None else environ
    return Path(environ.get("NS_STATE_DIR") or PROJECT_ROOT / ".state").resolve()


def task_retry_delay(environ: Mapping[str, str] | None = None) -> int:
    """Seconds between task retries (``NS_RETRY_DELAY_SECONDS``, default 120).

    Read from the environment, not a Variable, because DAG files use it at parse time.
    """
    environ = os.environ if environ is None else environ
    return int(environ.get("NS_RETRY_DELAY_SECONDS", 120))


def dag_schedule(dag_id: str, default: str, environ: Mapping[str, str] | None = None) -> str | None:
    """A DAG's schedule: ``NS_SCHEDULE_<DAG_ID>`` (a cron expression, a preset, or ``none``), else ``default``.

    Read from the environment, not a Variable, because the scheduler needs it at parse time.
    """
    environ = os.environ if environ is None else environ
    value = environ.get(f"{ENV_PREFIX}SCHEDULE_{dag_id.upper()}", default).strip()
    return None if value.lower() in ("", "none", "null") else value


def training_dag_id(dataset: str) -> str:
    """The training DAG of one dataset: ``network_security_training`` for the default, else ``<dataset>_training``.

    One DAG per dataset (generated from ``include/datasets/`` at parse time), so ``max_active_runs``,
    the retrain storm guard's active-run count and the UI's run list all hold per dataset.
    """
    return TRAINING_DAG_ID if dataset == DEFAULT_DATASET else f"{dataset}_training"


def training_pool(dataset: str) -> str:
    """The pool of one dataset's training tasks (``training_<dataset>``): one dataset's retrain never waits on another's.

    ``scripts.airflow_settings`` creates one per spec under ``include/datasets/`` from the
    ``training_{dataset}`` entry of ``airflow_settings.yaml``.
    """
    return f"training_{dataset}"


def model_name_for(settings: Settings, dataset: str) -> str:
    """The registered model of ``dataset``: the ``model_name`` setting names the settings' own dataset's model
    (a renamed model for the default dataset, or a test's own); every other dataset's model is its name."""
    return settings.model_name if settings.model_name and dataset == settings.dataset else dataset
