"""DAG runs for the tests: ``scripts.dag_runner.run_dag`` plus what the tests inspect through the ORM.

The product code reads runs through Airflow's public CLI and the project's own records; the
tests may look inside Airflow's metadata database (task states and XComs of a run, queued runs
with their conf), which is what this helper does, in one place.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scripts import dag_runner


@dataclass
class TestRun(dag_runner.RunReport):
    """A finished run with every task's state and every XCom (``task_id`` or ``task_id:key``).

    A mapped task instance is keyed ``task_id[label]``, the label being its rendered map index (the
    drift DAG's dataset) or, for one that did not run, that of another task at the same index.
    """

    outputs: dict[str, Any] = field(default_factory=dict)


def run_dag(
    dag_id: str, when: str | dt.datetime, conf: Mapping[str, Any] | None = None, log_path: Path | None = None
) -> TestRun:
    from airflow.models.dagrun import DagRun
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    report = dag_runner.run_dag(dag_id, when, conf=conf, log_path=log_path)
    run = TestRun(**report.__dict__)
    order = [t.task_id for t in dag_runner.load_dag(dag_id).topological_sort()]
    with create_session() as session:
        dag_run = session.query(DagRun).filter(DagRun.dag_id == dag_id, DagRun.run_id == report.run_id).one()
        instances = dag_run.get_task_instances(session=session)
        rows = session.scalars(XComModel.get_many(run_id=report.run_id, dag_ids=dag_id)).all()
        # A mapped group expanded over a list of per-dataset plans: index i is plans[i]["dataset"]; a label a task
        # rendered wins (a task instance that never ran, or skipped, may have none).
        labels: dict[int, str] = {}
        for row in rows:
            value = XComModel.deserialize_value(row) if row.map_index < 0 and row.key == "return_value" else None
            if isinstance(value, list) and value and all(isinstance(v, dict) and "dataset" in v for v in value):
                labels.update(enumerate(v["dataset"] for v in value))
        for ti in instances:
            if ti.map_index >= 0 and ti.rendered_map_index not in (None, "", str(ti.map_index)):
                labels[ti.map_index] = ti.rendered_map_index

        def named(task_id: str, map_index: int) -> str:
            return task_id if map_index < 0 else f"{task_id}[{labels.get(map_index, map_index)}]"

        states = {named(ti.task_id, ti.map_index): str(ti.state) for ti in instances}
        ranks = {task_id: rank for rank, task_id in enumerate(order)}
        run.task_states = dict(sorted(states.items(), key=lambda item: (ranks.get(item[0].split("[")[0], 0), item[0])))
        for row in rows:
            name = named(row.task_id, row.map_index)
            name = name if row.key == "return_value" else f"{name}:{row.key}"
            run.outputs[name] = XComModel.deserialize_value(row)
    return run


def queued_runs(dag_id: str) -> list[dict[str, Any]]:
    """Runs of ``dag_id`` created but not started, oldest first, with their conf."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        runs = session.query(DagRun).filter(DagRun.dag_id == dag_id, DagRun.state == "queued").all()
        found = [{"run_id": r.run_id, "logical_date": r.logical_date, "conf": dict(r.conf or {})} for r in runs]
    return sorted(found, key=lambda r: r["logical_date"])


def run_queued(dag_id: str, log_path: Path | None = None) -> list[tuple[dict[str, Any], TestRun]]:
    """Execute every queued run of ``dag_id`` with its own conf, as ``make run`` does (``dag.test()``)."""
    return [(run, run_dag(dag_id, run["logical_date"], run["conf"], log_path)) for run in queued_runs(dag_id)]


def discard_queued_runs(dag_id: str) -> None:
    """Leave no queued run behind for the other test modules."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        session.query(DagRun).filter(DagRun.dag_id == dag_id, DagRun.state == "queued").delete()
