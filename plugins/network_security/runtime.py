"""Run-time adapters called inside tasks (never at parse time): settings from the Variable, run plans,
clients and a SQL store from the plan's connections, and the domain errors of ``tasks/`` as Airflow's.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

from airflow.sdk import get_current_context

from tasks.config import SETTINGS_VARIABLE, Settings, training_dag_id
from tasks.delivery import client_wanted, model_server_on
from tasks.plan import CheckPlan, RunPlan


def plan(build: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any] | list[dict[str, Any]]:
    """``build`` (a planner of ``tasks.plan``; the monitoring ones plan a list) on the settings (the
    ``network_security_config`` Variable and ``NS_*``) and the known datasets, as XCom."""
    from airflow.sdk import Variable

    from tasks.dataset_spec import available_datasets

    with failures():
        settings = Settings.load(Variable.get(SETTINGS_VARIABLE, default="{}"))
        built = build(settings, *args, known_datasets=available_datasets(), **kwargs)
    return [each.to_xcom() for each in built] if isinstance(built, list) else built.to_xcom()


def _s3_hook(aws_conn_id: str) -> Any:
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    return S3Hook(aws_conn_id=aws_conn_id)


def s3(plan: RunPlan | CheckPlan) -> Any:
    """A boto3 S3 client from the AWS connection (its ``endpoint_url`` extra picks emulator or AWS)."""
    return _s3_hook(plan.settings.aws_conn_id).get_conn()


def _aws_hook(plan: RunPlan, client_type: str) -> Any:
    """The hook of another boto3 client (``ecr``, ``ec2``, ``ssm``, ``cloudwatch``) on the same connection."""
    from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

    return AwsBaseHook(aws_conn_id=plan.settings.aws_conn_id, client_type=client_type)


def aws_options(plan: RunPlan | CheckPlan) -> dict[str, Any]:
    """The AWS connection as boto3 keyword arguments, for clients Airflow does not build (GX's, the model server's)."""
    from tasks.storage import boto3_options

    hook = _s3_hook(plan.settings.aws_conn_id)
    return boto3_options(hook.get_credentials(), hook.conn_region_name, hook.conn_config.endpoint_url)


def browser_url(uri: str, aws_conn_id: str | None = None) -> str:
    """An ``s3://`` URI as a URL a browser opens (the emulator's, or the S3 console's)."""
    from tasks.storage import browser_url as url_of

    hook = _s3_hook(aws_conn_id or Settings().aws_conn_id)
    return url_of(hook.get_conn(), uri, hook.conn_config.endpoint_url, hook.conn_region_name)


def connection(conn_id: str) -> Any:
    from airflow.sdk import BaseHook

    return BaseHook.get_connection(conn_id)


def store(plan: RunPlan | CheckPlan) -> Any:
    """The monitoring store on the SQL hook of the plan's ``monitoring_conn_id``."""
    from tasks.monitoring_store import HookStore

    return HookStore(connection(plan.settings.monitoring_conn_id).get_hook())


def registry_login(plan: RunPlan) -> Callable[[], tuple[str, str]]:
    """ECR's temporary docker credentials on the plan's AWS connection, fetched when an image is pushed."""
    from airflow.providers.amazon.aws.hooks.ecr import EcrHook

    def login() -> tuple[str, str]:
        credentials = EcrHook(aws_conn_id=plan.settings.aws_conn_id).get_temporary_credentials()[0]
        return credentials.username, credentials.password

    return login


# What a step's parameters may name (``tasks.delivery``'s docstring), built from the plan when the step runs;
# the local model server on the serving connection, whose password is its API key.
PROVIDED: dict[str, Callable[[RunPlan], Any]] = {
    "s3": s3,
    **{name: lambda plan, name=name: _aws_hook(plan, name).get_conn() for name in ("ecr", "ec2", "ssm", "cloudwatch")},
    "region": lambda plan: _aws_hook(plan, "sts").conn_region_name or "us-east-1",
    "store": store,
    "server": lambda plan: model_server_on(plan, connection(plan.settings.serving_conn_id), aws_options(plan)),
    "api_key": lambda plan: connection(plan.settings.serving_conn_id).password,
    "registry_login": registry_login,
    "dag_run_id": lambda plan: get_current_context()["run_id"],
}


def call(step: Callable[..., Any], plan: RunPlan, *values: Any, **named: Any) -> Any:
    """``step`` (a function of ``tasks/``) on the plan, the clients its parameters name (``PROVIDED``; ``None``
    for a target the plan does not ship to: ``tasks.delivery.client_wanted``), then ``values`` in order."""
    parameters = inspect.signature(step).parameters
    given = {"plan": plan} if "plan" in parameters else {}
    for name in PROVIDED.keys() & parameters.keys():
        given[name] = PROVIDED[name](plan) if client_wanted(plan, name) else None
    free = [n for n, p in parameters.items() if n not in {**given, **named} and p.kind is p.POSITIONAL_OR_KEYWORD]
    return step(**given, **dict(zip(free[: len(values)], values, strict=True)), **named)


def active_training_runs(ti: Any, dataset: str) -> int:
    """Queued or running runs of ``dataset``'s own training DAG (through the Task SDK: no DB access from tasks)."""
    return ti.get_dr_count(dag_id=training_dag_id(dataset), states=["queued", "running"])


def reject(plan: RunPlan, reason: str, stage: str, files: list[str] | None = None) -> NoReturn:
    """Quarantine the day's drop and fail the task without retries (bad data stays bad)."""
    from airflow.sdk.exceptions import AirflowFailException

    from tasks.validate import quarantine_drop

    quarantine_uri = quarantine_drop(s3(plan), plan.layout, reason, stage, files)
    raise AirflowFailException(f"{stage} rejected the drop: {reason} (quarantined, see {quarantine_uri})")


@contextlib.contextmanager
def failures(plan: RunPlan | None = None) -> Iterator[None]:
    """Map the domain errors of ``tasks/`` to Airflow's: fail without retries, or skip."""
    from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

    from tasks.failure_modes import no_retry_errors, skip_errors
    from tasks.ingest import DataRejected

    try:
        yield
    except DataRejected as err:
        if plan is None:
            raise
        reject(plan, err.reason, "ingest", err.files)
    except no_retry_errors() as err:
        raise AirflowFailException(str(err)) from err
    except skip_errors() as err:
        raise AirflowSkipException(str(err)) from err
