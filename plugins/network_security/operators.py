"""Operators specific to this project."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
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
        super().__init__(
            configure_batch_definition=self._batch_definition,
            configure_expectations=self._expectations,
            result_format="SUMMARY",
            context_type="ephemeral",
            **kwargs,
        )
        self.plan_task_id = plan_task_id
        self._plan: RunPlan | None = None

    def _batch_definition(self, gx_context: Any) -> Any:
        from tasks.validate import snapshot_batch_definition

        return snapshot_batch_definition(gx_context, self._plan.layout.snapshot, runtime.aws_options(self._plan))

    def _expectations(self, gx_context: Any) -> Any:
        from tasks.validate import expectation_suite

        return expectation_suite(self._plan.spec)

    def execute(self, context: Context) -> str:
        from tasks.validate import describe_failures, write_validation_result

        self._plan = plan = RunPlan.from_xcom(context["ti"].xcom_pull(task_ids=self.plan_task_id))
        # Rebind to this instance: Airflow runs a copy of the operator built at parse time,
        # and the callables given to __init__ are bound to the original.
        self.configure_batch_definition = self._batch_definition
        self.configure_expectations = self._expectations
        try:
            super().execute(context)
        except GXValidationFailed as failure:
            result = context["ti"].xcom_pull(task_ids=self.task_id)
            result_uri = write_validation_result(runtime.s3(plan), plan.layout, result)
            reasons = "; ".join(describe_failures(result)) or str(failure)
            runtime.reject(plan, f"{reasons} (full result: {result_uri})", "validate")
        return write_validation_result(runtime.s3(plan), plan.layout, context["ti"].xcom_pull(task_ids=self.task_id))


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
        from airflow.sdk.exceptions import AirflowSkipException

        ti = context["ti"]
        decision = ti.xcom_pull(task_ids=self.decide_task_id, key="decision", map_indexes=ti.map_index)
        label_map_index(decision["dataset"])
        if reason := skip_reason(decision, triggers=True):
            raise AirflowSkipException(reason)
        self.trigger_dag_id = decision["training_dag_id"]
        self.trigger_run_id, self.conf = decision["retrain"]["run_id"], decision["retrain"]["conf"]
        return super().execute(context)
