"""Operators specific to this project."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import task
from great_expectations_provider.common.errors import GXValidationFailed
from great_expectations_provider.operators.validate_batch import GXValidateBatchOperator

from network_security import runtime
from network_security.dag_parts import MAP_INDEX_TEMPLATE, label_map_index
from network_security.links import ValidationResultLink
from tasks.plan import RunPlan
from tasks.retrain import skip_reason

if TYPE_CHECKING:
    from airflow.sdk import Context


class SnapshotValidationOperator(GXValidateBatchOperator):
    """Validate the day's snapshot in S3 with the dataset's GX suite; returns the stored result's URI.

    Batch and suite come from the run plan at run time; a failed validation quarantines the drop and
    fails without retries (the data will not change), infrastructure errors are retried.
    """

    ui_color = "#ffd9a8"
    operator_extra_links = (ValidationResultLink(),)

    def __init__(self, *, plan_task_id: str = "plan_run", **kwargs: Any) -> None:
        # Placeholders: batch and suite are the run plan's, so ``execute`` binds them (nothing is read at parse time).
        super().__init__(
            configure_batch_definition=lambda gx_context: None,
            configure_expectations=lambda gx_context: None,
            result_format="SUMMARY",
            context_type="ephemeral",
            **kwargs,
        )
        self.plan_task_id = plan_task_id

    def execute(self, context: Context) -> str:
        from tasks import validate

        plan = RunPlan.from_xcom(context["ti"].xcom_pull(task_ids=self.plan_task_id))
        # Bound to this run's plan, on the instance Airflow runs (a copy of the one built at parse time).
        self.configure_batch_definition = functools.partial(
            validate.snapshot_batch_definition, location=plan.layout.snapshot, boto3_options=runtime.aws_options(plan)
        )
        self.configure_expectations = lambda gx_context: validate.expectation_suite(plan.spec)
        try:
            super().execute(context)
        except GXValidationFailed as failure:
            result = context["ti"].xcom_pull(task_ids=self.task_id)
            result_uri = validate.write_validation_result(runtime.s3(plan), plan.layout, result)
            runtime.reject(plan, validate.rejection_reason(result, failure, result_uri), "validate")
        result = context["ti"].xcom_pull(task_ids=self.task_id)
        return validate.write_validation_result(runtime.s3(plan), plan.layout, result)


def mapped_decision(ti: Any, decide_task_id: str, *, triggers: bool) -> dict:
    """This map index's retrain decision (its instance named after the dataset); skips the branch task that
    ``tasks.retrain.skip_reason`` says must not run (``triggers``: the trigger branch asks)."""
    from airflow.sdk.exceptions import AirflowSkipException

    decision = ti.xcom_pull(task_ids=decide_task_id, key="decision", map_indexes=ti.map_index)
    label_map_index(decision["dataset"])
    if reason := skip_reason(decision, triggers=triggers):
        raise AirflowSkipException(reason)
    return decision


class RetrainTrigger(TriggerDagRunOperator):
    """The training run this map index's decision (``tasks.drift.decision_xcom``) asks for, on the dataset's DAG;
    otherwise it skips itself with the reason (``tasks.retrain.skip_reason`` says why it must)."""

    def __init__(self, *, decide_task_id: str = "decide_retraining", **kwargs: Any) -> None:
        super().__init__(
            trigger_dag_id=f"{{{{ ti.xcom_pull(task_ids={decide_task_id!r}, key='decision', map_indexes=ti.map_index)"
            "['training_dag_id'] }}",
            skip_when_already_exists=True,
            wait_for_completion=False,
            map_index_template=MAP_INDEX_TEMPLATE,
            **kwargs,
        )
        self.decide_task_id = decide_task_id

    def execute(self, context: Context) -> Any:
        decision = mapped_decision(context["ti"], self.decide_task_id, triggers=True)
        self.trigger_dag_id = decision["training_dag_id"]
        self.trigger_run_id, self.conf = decision["retrain"]["run_id"], decision["retrain"]["conf"]
        return super().execute(context)


def no_retraining(decide_task_id: str = "decide_retraining") -> Any:
    """The mapped ``no_retraining`` task: says why not, or skips itself (like ``RetrainTrigger``) when triggered."""

    @task(task_id="no_retraining", map_index_template=MAP_INDEX_TEMPLATE)
    def no_retraining_task(ti: Any = None) -> dict:
        """Say why no training run was triggered."""
        decision = mapped_decision(ti, decide_task_id, triggers=False)
        return {"dataset": decision["dataset"], "outcome": decision["outcome"], "reason": decision["reason"]}

    return no_retraining_task()
