"""Operator extra links: a task's page links to what it produced (MLflow run, Evidently report, GX result).

Each link reads the task's own return value (no value: no link). Registered in ``network_security_plugin.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from airflow.sdk import BaseOperatorLink

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator
    from airflow.sdk.types import TaskInstanceKey


def _return_value(ti_key: TaskInstanceKey) -> Any:
    from airflow.sdk import BaseXCom

    return BaseXCom.get_value(ti_key=ti_key, key="return_value")


class _ResultFieldLink(BaseOperatorLink):
    """The URL in one field of the task's returned mapping (empty when the task returned none)."""

    field: ClassVar[str]

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        value = _return_value(ti_key)
        return str(value.get(self.field) or "") if isinstance(value, dict) else ""


class MLflowRunLink(_ResultFieldLink):
    name = "MLflow run"
    field = "mlflow_run_url"


class EvidentlyReportLink(_ResultFieldLink):
    name = "Evidently report"
    field = "report_url"


class ValidationResultLink(BaseOperatorLink):
    """The stored GX result (the task returns its ``s3://`` URI), opened over HTTP."""

    name = "Validation result"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        from network_security.runtime import browser_url

        uri = _return_value(ti_key)
        if not isinstance(uri, str) or not uri.startswith("s3://"):
            return ""
        return browser_url(uri, getattr(operator, "aws_conn_id", None))


ALL_LINKS = (MLflowRunLink(), EvidentlyReportLink(), ValidationResultLink())


def with_links(output: Any, *links: BaseOperatorLink) -> Any:
    """Give the task behind a ``@task`` output (an XComArg) these extra links; returns the output."""
    output.operator.operator_extra_links = tuple(links)
    return output
