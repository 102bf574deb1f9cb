"""The monitoring store: the promotion, deployment, drift-check and retrain logs, as rows and queries.

The tables are created by ``include/sql/monitoring_store.sql``; the queries live next to it
(``include/sql/*.sql``) and take named parameters (``:dataset``), so every filter runs in SQL.
This module builds the rows (plain functions of what was decided) and runs the queries on
a :class:`Store`: inside Airflow the SQL hook of the ``monitoring_store`` connection
(SQLite here, Postgres in compose), in unit tests a ``sqlite3`` connection.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from tasks.dataset_spec import PROJECT_ROOT
from tasks.evaluate import finite
from tasks.quality import QUALITY_CHECK_FIELDS

SQL_DIR = PROJECT_ROOT / "include" / "sql"

# table -> (columns in insert order, primary key); the DDL in monitoring_store.sql matches.
TABLES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "promotion_log": (
        (
            "dag_run_id", "model_name", "model_version", "mlflow_run_id", "ds", "decision", "reason",
            "primary_metric", "challenger_metric", "champion_version", "champion_metric", "metrics_json",
            "decided_at",
        ),
        ("dag_run_id", "model_version"),
    ),
    "deployment_log": (
        (
            "deployment_id", "dag_run_id", "action", "target", "model_name", "model_version", "image_uri",
            "instance_ids", "endpoint", "status", "detail", "recorded_at",
        ),
        ("deployment_id",),
    ),
    "drift_check": (
        (
            "dag_run_id", "dataset", "model_name", "champion_version", "window_start", "window_end",
            "current_rows", "evaluated_rows", "reference_rows", "max_psi", "prediction_psi", "drifted_features",
            "drift_detected", "decision", "reason", "report_uri", "triggered_run_id", "checked_at",
        ),
        ("dag_run_id", "dataset"),  # one drift DAG run checks every dataset with a champion
    ),
    "retrain_log": (
        (
            "run_id", "dataset", "model_name", "signals", "reason", "conf_json", "window_end",
            "source_dag_run_id", "requested_at",
        ),
        ("run_id",),
    ),
    "quality_check": (QUALITY_CHECK_FIELDS, ("dag_run_id", "dataset")),  # mapped over datasets like drift
}  # fmt: skip


class Store(Protocol):
    """What the monitoring store needs of a database (the SQL hook's ``insert_rows``, plus a query)."""

    def insert_rows(
        self,
        table: str,
        rows: Iterable[tuple[Any, ...]],
        target_fields: Sequence[str] | None = None,
        *,
        replace: bool = False,
        replace_index: Sequence[str] | None = None,
    ) -> None: ...

    def query(self, sql: str, parameters: Mapping[str, Any]) -> list[dict[str, Any]]: ...


class HookStore:
    """A :class:`Store` on a SQL hook (anything with ``insert_rows`` and ``get_sqlalchemy_engine``).

    Inserts go through the hook; queries through its SQLAlchemy engine, which binds the named
    parameters of ``include/sql/*.sql`` in whatever style the driver wants.
    """

    def __init__(self, hook: Any) -> None:
        self.hook = hook
        self.insert_rows = hook.insert_rows

    def query(self, sql: str, parameters: Mapping[str, Any]) -> list[dict[str, Any]]:
        from sqlalchemy import text

        with self.hook.get_sqlalchemy_engine().connect() as db:
            return [dict(row._mapping) for row in db.execute(text(sql), dict(parameters))]


def now() -> str:
    """The current time as the logs store it (ISO 8601, UTC)."""
    return dt.datetime.now(dt.UTC).isoformat()


def write(store: Store, table: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """Upsert ``rows`` (mappings with every column of ``table``) by the table's primary key: reruns overwrite."""
    columns, key = TABLES[table]
    if rows:
        store.insert_rows(
            table,
            [tuple(row[c] for c in columns) for row in rows],
            target_fields=columns,
            replace=True,
            replace_index=list(key),
        )


def query(store: Store, name: str, **parameters: Any) -> list[dict[str, Any]]:
    """Run ``include/sql/<name>.sql`` with named parameters; rows as mappings."""
    return store.query((SQL_DIR / f"{name}.sql").read_text(), parameters)


# --- rows ------------------------------------------------------------------------------------


def promotion_row(
    *, dag_run_id: str, model_name: str, ds: str, evaluation: Mapping[str, Any], decided_at: str
) -> dict[str, Any]:
    """The promotion log's row of one gate decision (``evaluation`` is the evaluate step's result)."""
    primary = evaluation["primary_metric"]
    challenger, champion = evaluation["challenger_metrics"], evaluation["champion_metrics"]
    return {
        "dag_run_id": dag_run_id,
        "model_name": model_name,
        "model_version": evaluation["challenger_version"],
        "mlflow_run_id": evaluation["run_id"],
        "ds": ds,
        "decision": evaluation["decision"],
        "reason": "; ".join(evaluation["reasons"]),
        "primary_metric": primary,
        "challenger_metric": finite((challenger or {}).get(primary)),
        "champion_version": evaluation["champion_version"],
        "champion_metric": finite((champion or {}).get(primary)),
        "metrics_json": json.dumps({"challenger": challenger, "champion": champion}),
        "decided_at": decided_at,
    }


def deployment_row(
    *,
    dag_run_id: str,
    action: str,
    target: str,
    model_name: str,
    model_version: str,
    status: str,
    detail: str,
    recorded_at: str,
    image_uri: str | None = None,
    instance_ids: Sequence[str] | None = None,
    endpoint: str | None = None,
) -> dict[str, Any]:
    """The deployment log's row of one target of a deploy or rollback (``action``)."""
    return {
        "deployment_id": f"{dag_run_id}/{target}/{action}",
        "dag_run_id": dag_run_id,
        "action": action,
        "target": target,
        "model_name": model_name,
        "model_version": model_version,
        "image_uri": image_uri,
        "instance_ids": json.dumps(list(instance_ids)) if instance_ids is not None else None,
        "endpoint": endpoint,
        "status": status,
        "detail": detail,
        "recorded_at": recorded_at,
    }


def drift_check_row(
    *,
    dag_run_id: str,
    dataset: str,
    model_name: str,
    window_start: str,
    window_end: str,
    summary: Mapping[str, Any] | None,
    decision: str,
    reason: str,
    checked_at: str,
    triggered_run_id: str | None = None,
) -> dict[str, Any]:
    """The drift_check row of one check; ``summary`` is the check's (partial for a skipped check)."""
    summary = summary or {}
    rows = summary.get("rows") or {}
    return {
        "dag_run_id": dag_run_id,
        "dataset": dataset,
        "model_name": model_name,
        "champion_version": (summary.get("champion") or {}).get("model_version"),
        "window_start": window_start,
        "window_end": window_end,
        "current_rows": rows.get("current"),
        "evaluated_rows": rows.get("evaluated"),
        "reference_rows": rows.get("reference"),
        "max_psi": summary.get("max_psi"),
        "prediction_psi": summary.get("prediction_psi"),
        "drifted_features": json.dumps(summary.get("drifted_features", [])),
        "drift_detected": int(bool(summary.get("drift_detected"))),
        "decision": decision,
        "reason": reason,
        "report_uri": summary.get("report_uri"),
        "triggered_run_id": triggered_run_id,
        "checked_at": checked_at,
    }


def retrain_row(
    *,
    run_id: str,
    model_name: str,
    conf: Mapping[str, Any],
    window_end: str,
    source_dag_run_id: str,
    requested_at: str,
) -> dict[str, Any]:
    """The retrain_log row of a triggered training run (its conf names dataset, signals and reason)."""
    return {
        "run_id": run_id,
        "dataset": conf["dataset"],
        "model_name": model_name,
        "signals": json.dumps(list(conf.get("signals", []))),
        "reason": conf.get("reason", ""),
        "conf_json": json.dumps(dict(conf), default=str),
        "window_end": window_end,
        "source_dag_run_id": source_dag_run_id,
        "requested_at": requested_at,
    }


# --- queries ---------------------------------------------------------------------------------


def drift_history(store: Store, dataset: str, before: str, limit: int = 50) -> list[bool]:
    """``drift_detected`` of the dataset's checks before ``before`` (skipped ones left out), newest first."""
    rows = query(store, "recent_drift_checks", dataset=dataset, before=before, limit=limit)
    return [bool(row["drift_detected"]) for row in rows]


def last_retrain_at(store: Store, dataset: str, before: str) -> dt.datetime | None:
    """Window end of the newest retrain triggered for the dataset before ``before``, for any reason."""
    rows = query(store, "last_retrain", dataset=dataset, before=before)
    value = rows[0]["window_end"] if rows else None
    return dt.datetime.fromisoformat(value) if value else None


def retrain_request(store: Store, run_id: str) -> dict[str, Any] | None:
    """The logged retrain of training run ``run_id`` (its ``conf`` decoded), or None."""
    rows = query(store, "retrain_request", run_id=run_id)
    if not rows:
        return None
    row = dict(rows[0])
    row["conf"] = json.loads(row.pop("conf_json"))
    row["signals"] = json.loads(row["signals"])
    return row


def rows_of_run(store: Store, name: str, dag_run_id: str) -> list[dict[str, Any]]:
    """What one DAG run wrote: ``name`` is ``promotions_of_run``, ``deployments_of_run`` or ``drift_check_of_run``."""
    return query(store, name, dag_run_id=dag_run_id)


def log_retrain(store: Store, decision: Any, model_name: str, window_end: str, dag_run_id: str) -> None:
    """The ``retrain_log`` row of a triggered retrain (drift and quality alike): what the storm guard counts."""
    row = retrain_row(
        run_id=decision.run_id,
        model_name=model_name,
        conf=decision.conf,
        window_end=window_end,
        source_dag_run_id=dag_run_id,
        requested_at=now(),
    )
    write(store, "retrain_log", [row])
