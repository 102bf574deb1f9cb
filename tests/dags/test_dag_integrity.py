"""DagBag integrity: every DAG imports cleanly, offline, with the project's conventions."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

DAGS_FOLDER = Path(__file__).resolve().parents[2] / "dags"

EXPECTED_EDGES = {
    "network_security_training": {
        ("plan_run", "wait_for_drop"),
        ("wait_for_drop", "ingest"),
        ("ingest", "validate"),
        ("validate", "transform"),
        ("transform", "start_training"),
        ("validate", "start_training"),
        ("start_training", "train_candidate"),
        ("transform", "train_candidate"),
        ("train_candidate", "train"),
        ("start_training", "train"),
        ("train", "evaluate"),
        ("evaluate", "gate"),
        ("gate", "release.candidate"),
        ("gate", "keep_champion"),
        ("plan_run", "ensure_monitoring_store"),
        ("ensure_monitoring_store", "evaluate"),
        ("release.candidate", "release.route_approval"),
        ("release.route_approval", "release.approve_release"),
        ("release.route_approval", "release.publish_image"),
        ("release.approve_release", "release.publish_image"),
        ("release.publish_image", "release.deploy_candidate"),
        ("release.deploy_candidate", "release.shadow"),
        ("release.shadow", "release.canary_10"),
        ("release.canary_10", "release.canary_50"),
        ("release.canary_50", "release.canary_100"),
        ("release.canary_100", "release.complete"),
        ("release.canary_50", "release.abort"),
        ("release.complete", "release.abort"),
        ("release.complete", "release.outcome"),
        ("release.abort", "release.outcome"),
    },
    "network_security_deploy": {
        ("plan_run", "ensure_monitoring_store"),
        ("ensure_monitoring_store", "choose_release"),
        ("choose_release", "deploy.resolve_release"),
        ("deploy.smoke_test", "deploy.record_deployment"),
    },
    "network_security_drift": {
        ("plan_check", "ensure_monitoring_store"),
        ("ensure_monitoring_store", "check_drift"),
        ("check_drift", "decide_retraining"),
        ("decide_retraining", "trigger_retraining"),
        ("decide_retraining", "no_retraining"),
    },
    "network_security_quality": {
        ("plan_check", "ensure_monitoring_store"),
        ("ensure_monitoring_store", "check_quality"),
        ("check_quality", "decide_retraining"),
        ("decide_retraining", "trigger_retraining"),
        ("decide_retraining", "no_retraining"),
    },
    "network_security_batch_scoring": {
        ("plan_run", "wait_for_backlog"),
        ("wait_for_backlog", "score_backlog"),
    },
}


def _dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS_FOLDER))


@pytest.fixture(scope="module")
def offline_dagbag():
    """The DagBag parsed with every network connection and every Variable read refused."""
    from airflow.sdk import Variable

    def refuse_connect(*args, **kwargs):
        raise AssertionError("a DAG file opened a network connection at parse time")

    def refuse_variable(*args, **kwargs):
        raise AssertionError("a DAG file read an Airflow Variable at parse time")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", refuse_connect)
        patch.setattr(Variable, "get", refuse_variable)
        yield _dagbag()


def test_no_import_errors(offline_dagbag):
    assert offline_dagbag.import_errors == {}
    assert set(EXPECTED_EDGES) <= set(offline_dagbag.dag_ids)


def test_one_dag_per_file_and_one_training_dag_per_dataset(offline_dagbag):
    from tasks.config import training_dag_id
    from tasks.dataset_spec import available_datasets

    training = {training_dag_id(dataset): dataset for dataset in available_datasets()}
    assert training["network_security_training"] == "network_security"
    assert training["intrusion_flows_training"] == "intrusion_flows"
    for dag in offline_dagbag.dags.values():
        stem = Path(dag.fileloc).stem
        assert dag.dag_id in training if stem == "network_security_training" else stem == dag.dag_id, dag.dag_id
    assert set(training) <= set(offline_dagbag.dags)


def test_each_training_dag_trains_its_dataset_alone_and_in_its_own_pool(offline_dagbag):
    """max_active_runs and the pool hold per dataset: A's retrain never waits for B's."""
    from scripts.airflow_settings import SETTINGS_FILE, import_files, load_settings
    from tasks.config import training_dag_id
    from tasks.dataset_spec import available_datasets

    declared = import_files(load_settings(SETTINGS_FILE, {}))["pools"]
    reference = offline_dagbag.dags["network_security_training"]
    for dataset in available_datasets():
        dag = offline_dagbag.dags[training_dag_id(dataset)]
        assert dag.max_active_runs == 1
        assert dag.params["dataset"] == dataset
        assert dag.params.get_param("dataset").schema["enum"] == [dataset]  # another dataset's conf is refused
        assert f"dataset:{dataset}" in dag.tags
        assert dag.get_task("train").pool == f"training_{dataset}"
        assert {task.pool for task in dag.tasks} <= {"default_pool", "aliases", f"training_{dataset}"}
        assert {task.pool for task in dag.tasks} <= {"default_pool", *declared}  # every pool exists once applied
        assert set(dag.task_ids) == set(reference.task_ids)  # the same body
    assert declared["training_intrusion_flows"]["slots"] == declared["training_network_security"]["slots"] == 3


@pytest.mark.parametrize("dataset", ["network_security", "intrusion_flows"])
def test_a_training_dag_refuses_another_datasets_conf(offline_dagbag, dataset):
    from airflow.sdk.definitions.param import ParamValidationError

    from tasks.config import training_dag_id

    param = offline_dagbag.dags[training_dag_id(dataset)].params.get_param("dataset")
    other = "intrusion_flows" if dataset == "network_security" else "network_security"
    assert param.resolve(dataset) == dataset
    with pytest.raises(ParamValidationError):
        param.resolve(other)


@pytest.mark.parametrize("dag_id", sorted(EXPECTED_EDGES))
def test_conventions(offline_dagbag, dag_id):
    dag = offline_dagbag.dags[dag_id]
    assert dag.tags, "every DAG needs tags"
    assert dag.doc_md and len(dag.doc_md) > 200, "every DAG documents itself in Markdown"
    for task in dag.tasks:
        assert task.owner not in ("", "airflow"), f"{task.task_id} has no owner"
        assert task.retries >= 2, f"{task.task_id} has retries={task.retries}"


@pytest.mark.parametrize("dag_id", sorted(EXPECTED_EDGES))
def test_expected_edges(offline_dagbag, dag_id):
    dag = offline_dagbag.dags[dag_id]
    edges = {(t.task_id, d) for t in dag.tasks for d in t.downstream_task_ids}
    missing = EXPECTED_EDGES[dag_id] - edges
    assert not missing, f"missing edges: {missing}"


def test_parsing_imports_no_heavy_libraries():
    """pandas, sklearn, GX, MLflow and Evidently load inside tasks, not when the scheduler parses."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        f"bag = DagBag(dag_folder={str(DAGS_FOLDER)!r})\n"
        "assert not bag.import_errors, bag.import_errors\n"
        "heavy = [m for m in ('pandas', 'sklearn', 'great_expectations', 'mlflow', 'evidently') if m in sys.modules]\n"
        "print('HEAVY=' + ','.join(heavy))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "HEAVY=\n" in done.stdout, done.stdout


def test_the_release_runs_only_after_the_gate_and_aborts_only_on_failure(offline_dagbag):
    from airflow.providers.standard.operators.hitl import ApprovalOperator

    training = offline_dagbag.dags["network_security_training"]
    assert not [t for t in training.task_ids if t.startswith("deploy.")]  # no promote-then-deploy any more
    assert training.get_task("release.candidate").upstream_task_ids == {"gate", "evaluate", "plan_run"}
    abort = training.get_task("release.abort")
    assert abort.trigger_rule == "one_failed"
    stages = ["release.shadow", "release.canary_10", "release.canary_50", "release.canary_100"]
    assert abort.upstream_task_ids >= {*stages, "release.deploy_candidate", "release.complete"}
    for stage in stages:  # waiting on live metrics holds no worker slot
        assert training.get_task(stage).mode == "reschedule"
    complete = training.get_task("release.complete")
    assert complete.pool == "aliases"  # one alias move at a time
    assert training.get_task("release.outcome").trigger_rule == "all_done"
    approval = training.get_task("release.approve_release")
    assert isinstance(approval, ApprovalOperator)
    assert approval.defaults == ["Reject"] and approval.response_timeout is not None
    assert training.get_task("release.publish_image").trigger_rule == "none_failed_min_one_success"
    # The deploy DAG ships the champion through the deploy group and never rolls back twice.
    assert "deploy.rollback" not in offline_dagbag.dags["network_security_deploy"].task_ids


@pytest.mark.parametrize("check_dag", ["network_security_drift", "network_security_quality"])
def test_drift_trigger_is_idempotent_and_training_runs_one_at_a_time(offline_dagbag, check_dag):
    """Storm protection that lives in the DAG definitions themselves (drift and quality alike)."""
    drift = offline_dagbag.dags[check_dag]
    trigger = drift.get_task("trigger_retraining")
    # The dataset's own training DAG, run id and conf, from this map index's decision.
    assert type(trigger).__name__ == "RetrainTrigger" and trigger.decide_task_id == "decide_retraining"
    value = trigger.trigger_dag_id
    assert (
        "task_ids='decide_retraining'" in value and "map_indexes=ti.map_index" in value and "training_dag_id" in value
    )
    assert trigger.skip_when_already_exists is True  # a retried trigger task creates no second run
    assert trigger.wait_for_completion is False
    assert offline_dagbag.dags["network_security_training"].max_active_runs == 1
    assert drift.max_active_runs == 1


def test_the_drift_checks_are_mapped_per_dataset(offline_dagbag):
    drift = offline_dagbag.dags["network_security_drift"]
    group = drift.task_group_dict["per_dataset"]
    assert type(group).__name__ == "MappedTaskGroup"
    mapped = {"check_drift", "decide_retraining", "trigger_retraining", "no_retraining"}
    assert {task.task_id for task in group} == mapped
    for task_id in mapped:  # the grid names each map index after its dataset
        assert drift.get_task(task_id).map_index_template == "{{ dataset }}"


def test_candidates_are_mapped_and_the_pool_fits_one_run_of_them(offline_dagbag):
    """One mapped task per candidate, side by side in the `training` pool; the pool has a slot
    per candidate and the DAG one active run, so one run's candidates can all run at once."""
    import yaml

    from tasks.train import load_training_config

    training = offline_dagbag.dags["network_security_training"]
    candidate = training.get_task("train_candidate")
    assert candidate.is_mapped
    assert candidate.pool == training.get_task("train").pool == "training_network_security"
    assert training.max_active_runs == 1
    settings = yaml.safe_load((DAGS_FOLDER.parent / "airflow_settings.yaml").read_text())
    (pool,) = [p for p in settings["airflow"]["pools"] if p["pool_name"] == "training_{dataset}"]
    assert int(pool["pool_slot"]) == len(load_training_config().candidates)


@pytest.mark.parametrize(
    ("dag_id", "task_id", "links"),
    [
        ("network_security_training", "validate", {"Validation result"}),
        ("network_security_training", "train", {"MLflow run"}),
        ("network_security_training", "evaluate", {"MLflow run"}),
        ("network_security_drift", "check_drift", {"Evidently report", "MLflow run"}),
        ("network_security_quality", "check_quality", {"Evidently report", "MLflow run"}),
    ],
)
def test_tasks_link_to_what_they_produced(offline_dagbag, dag_id, task_id, links):
    task = offline_dagbag.dags[dag_id].get_task(task_id)
    assert {link.name for link in task.operator_extra_links} == links


def test_the_plugin_registers_the_links():
    from airflow import plugins_manager

    names = {type(link).__name__ for link in plugins_manager.get_operator_extra_links()}
    assert {"MLflowRunLink", "EvidentlyReportLink", "ValidationResultLink"} <= names


def test_assets_trace_the_raw_drop_to_the_served_model(offline_dagbag):
    training = offline_dagbag.dags["network_security_training"]

    def names(objects):
        return {asset.name for asset in objects}

    assert names(training.get_task("ingest").inlets) == {"network_security_raw_drops"}
    assert names(training.get_task("ingest").outlets) == {"network_security_snapshots"}
    assert names(training.get_task("release.complete").outlets) == {
        "network_security_champion",
        "network_security_served_model",
    }
    assert not training.get_task("keep_champion").outlets  # a kept champion is no new asset version


def test_the_sensor_never_holds_a_slot_and_is_not_cut_by_the_task_time_limit(offline_dagbag):
    """Poke mode would hold a worker slot for up to 12 h and be killed by the 1 h execution_timeout;
    in reschedule mode (and deferred) the time limit bounds one poke, the sensor's timeout the wait."""
    sensor = offline_dagbag.dags["network_security_training"].get_task("wait_for_drop")
    assert sensor.mode == "reschedule"
    assert sensor.timeout == 12 * 3600 > sensor.execution_timeout.total_seconds()
    assert sensor.poke_interval <= 300


def test_the_sensor_defers_where_a_triggerer_runs():
    """make airflow, the distributed mode and compose set [operators] default_deferrable."""
    import os
    import subprocess
    import sys

    code = (
        "from airflow.dag_processing.dagbag import DagBag\n"
        f"bag = DagBag(dag_folder={str(DAGS_FOLDER)!r})\n"
        "print('DEFERRABLE=' + str(bag.dags['network_security_training'].get_task('wait_for_drop').deferrable))\n"
    )
    for setting, expected in (("True", "True"), ("False", "False")):
        env = {**os.environ, "AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE": setting}
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
        assert f"DEFERRABLE={expected}" in done.stdout, done.stderr[-2000:]


@pytest.mark.parametrize(
    ("dag_id", "task_id", "field", "plan_task"),
    [
        ("network_security_training", "wait_for_drop", "aws_conn_id", "plan_run"),
        ("network_security_training", "ensure_monitoring_store", "conn_id", "plan_run"),
        ("network_security_drift", "ensure_monitoring_store", "conn_id", "plan_check"),
        ("network_security_quality", "ensure_monitoring_store", "conn_id", "plan_check"),
        ("network_security_batch_scoring", "wait_for_backlog", "aws_conn_id", "plan_run"),
        ("network_security_deploy", "ensure_monitoring_store", "conn_id", "plan_run"),
    ],
)
def test_operators_use_the_connections_of_the_run_plan(offline_dagbag, dag_id, task_id, field, plan_task):
    """The ids the tasks' code uses (the plan's settings: NS_* and the Variable applied) are the operators' too."""
    task = offline_dagbag.dags[dag_id].get_task(task_id)
    value = getattr(task, field)
    assert field in task.template_fields
    assert value.startswith("{{ ti.xcom_pull(task_ids=" + repr(plan_task)) and "['settings']" in value, value


def test_every_dag_gets_its_defaults_from_one_place(offline_dagbag):
    from network_security import alerts

    for dag in offline_dagbag.dags.values():
        for task in dag.tasks:
            assert task.on_failure_callback in ([alerts.on_task_failure], alerts.on_task_failure), task.task_id
            assert task.execution_timeout is not None, task.task_id
