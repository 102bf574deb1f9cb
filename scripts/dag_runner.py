"""Run a DAG in-process with ``dag.test()`` and read what Airflow's public CLI says about runs.

``make run`` and ``make deploy`` run their DAG runs this way: no scheduler, the same code path
as ``airflow dags test``. A run queued by ``TriggerDagRunOperator`` (the drift check's retrain)
is executed the same way, with its own conf, as ``dag.test()`` does it: the run at that
logical date is replaced by a ``manual__`` run (``dag.test()`` names its runs itself; keeping
the queued id would take a scheduler, which ``make airflow`` and the distributed mode have).
Task states and queued runs come from ``airflow tasks states-for-dag-run`` and
``airflow dags list-runs`` (the metadata DB is Airflow's, read through Airflow's CLI).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pendulum

from scripts.services import PROJECT_ROOT, airflow_json


@dataclass
class RunReport:
    dag_id: str
    run_id: str
    state: str
    logical_date: dt.datetime | None = None
    task_states: dict[str, str] = field(default_factory=dict)

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
    """The DAG, freshly parsed from the project's DAG folder."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(PROJECT_ROOT / "dags"))
    if bag.import_errors:
        raise RuntimeError(f"DAG import errors: {bag.import_errors}")
    return bag.dags[dag_id]


def logical_date_of(when: str | dt.datetime) -> dt.datetime:
    return when if isinstance(when, dt.datetime) else pendulum.parse(when, tz="UTC")


def run_dag(
    dag_id: str, when: str | dt.datetime, conf: Mapping[str, Any] | None = None, log_path: Path | None = None
) -> RunReport:
    """Run one DAG run at ``when`` (a day, a timestamp or a datetime) to completion with ``dag.test()``.

    A run already at that logical date (e.g. one queued by ``TriggerDagRunOperator``) is
    replaced by this one: that is how ``dag.test()`` executes a triggered run's conf.
    """
    dag = load_dag(dag_id)
    logical_date = logical_date_of(when)
    with output_to(log_path):
        dag_run = dag.test(logical_date=logical_date, run_conf=dict(conf) if conf else None)
    return RunReport(dag_id=dag_id, run_id=dag_run.run_id, state=str(dag_run.state), logical_date=logical_date)


def task_states(dag_id: str, run_id: str) -> dict[str, str]:
    """Every task's state in one run, in the DAG's order (``airflow tasks states-for-dag-run``)."""
    rows = airflow_json("tasks", "states-for-dag-run", dag_id, run_id)
    states = {row["task_id"]: str(row["state"]) for row in rows}
    return {task_id: states[task_id] for task_id in task_order(dag_id) if task_id in states}


@functools.cache
def task_order(dag_id: str) -> tuple[str, ...]:
    """The DAG's task ids in topological order (parsed once per process)."""
    return tuple(t.task_id for t in load_dag(dag_id).topological_sort())


def queued_runs(dag_id: str) -> list[dict[str, Any]]:
    """Runs of ``dag_id`` created but not started (e.g. by a trigger), oldest first (``airflow dags list-runs``)."""
    rows = airflow_json("dags", "list-runs", dag_id, "--state", "queued")
    runs = [{"run_id": row["run_id"], "logical_date": dt.datetime.fromisoformat(row["logical_date"])} for row in rows]
    return sorted(runs, key=lambda run: run["logical_date"])
