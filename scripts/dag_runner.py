"""Run a DAG in-process with ``dag.test()`` and report task states and outputs.

Used by ``make run`` and by the integration tests, so both exercise the DAG exactly
as ``airflow dags test`` would, against the stack the environment points at.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pendulum

from scripts.airflow_settings import PROJECT_ROOT


@dataclass
class RunReport:
    dag_id: str
    run_id: str
    state: str
    task_states: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)

    @property
    def succeeded(self) -> bool:
        return self.state == "success"


@contextlib.contextmanager
def output_to(log_path: Path | None) -> Iterator[None]:
    """Send everything written to stdout/stderr (Airflow's task logs included) to a file."""
    if log_path is None:
        yield
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    saved = os.dup(1), os.dup(2)
    with log_path.open("ab") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def load_dag(dag_id: str) -> Any:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(PROJECT_ROOT / "dags"))
    if bag.import_errors:
        raise RuntimeError(f"DAG import errors: {bag.import_errors}")
    return bag.dags[dag_id]


def run_dag(
    dag_id: str,
    ds: str | datetime,
    conf: dict[str, Any] | None = None,
    log_path: Path | None = None,
    run_id: str | None = None,
) -> RunReport:
    """Run one DAG run at ``ds`` (a day, a timestamp or a datetime) to completion; collect its XComs.

    ``outputs`` maps a task id to its return value, and ``"<task_id>:<key>"`` to other keys.
    A run already at that logical date (e.g. one queued by ``TriggerDagRunOperator``) is
    replaced by this one: that is how ``dag.test()`` executes a triggered run's conf.
    ``run_id`` keeps the replaced run's id (default: a new ``manual__`` id).
    """
    from unittest import mock

    from airflow.models.dagrun import DagRun
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    dag = load_dag(dag_id)
    logical_date = ds if isinstance(ds, datetime) else pendulum.parse(ds, tz="UTC")
    # dag.test() always names its run manual__<time>; a triggered run keeps its own id, so
    # the drift check that queued it, its idempotent trigger and the run agree on it.
    naming = mock.patch.object(DagRun, "generate_run_id", return_value=run_id) if run_id else contextlib.nullcontext()
    with output_to(log_path), naming:
        dag_run = dag.test(logical_date=logical_date, run_conf=conf or None)
    report = RunReport(dag_id=dag_id, run_id=dag_run.run_id, state=str(dag_run.state))
    with create_session() as session:
        states = {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances(session=session)}
        report.task_states = {
            task_id: states[task_id] for task_id in (t.task_id for t in dag.topological_sort()) if task_id in states
        }
        rows = session.scalars(XComModel.get_many(run_id=dag_run.run_id, dag_ids=dag_id)).all()
        for row in rows:
            name = row.task_id if row.key == "return_value" else f"{row.task_id}:{row.key}"
            report.outputs[name] = XComModel.deserialize_value(row)
    return report


def queued_runs(dag_id: str) -> list[dict[str, Any]]:
    """Runs of ``dag_id`` created but not started (e.g. by a trigger), oldest first."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        runs = session.query(DagRun).filter(DagRun.dag_id == dag_id, DagRun.state == "queued").all()
        found = [{"run_id": r.run_id, "logical_date": r.logical_date, "conf": dict(r.conf or {})} for r in runs]
    return sorted(found, key=lambda r: r["logical_date"])


def run_queued(dag_id: str, log_path: Path | None = None) -> list[tuple[str, RunReport]]:
    """Execute every queued run of ``dag_id`` with its own conf (no scheduler needed)."""
    return [
        (run["run_id"], run_dag(dag_id, run["logical_date"], run["conf"], log_path, run_id=run["run_id"]))
        for run in queued_runs(dag_id)
    ]
