"""Several datasets side by side on the local stack: one server, one endpoint, log, monitor and training DAG per model.

One story, in order. ``network_security`` (as its own registered model, ``NS_MODEL_NAME``)
and ``intrusion_flows`` are trained by their own training DAGs and shipped to the one local
model server; a client keeps sending to both while ``intrusion_flows`` is released (v2) and
rolled back (v1), and ``network_security``'s answers never change; then drifted traffic of
``intrusion_flows`` triggers exactly one training run, of ``intrusion_flows_training``, while
``network_security``'s check, champion and cooldown are left as they were.

The steps are those of the README's "Add a dataset" section (``README_STEPS``):
``test_the_readme_section_is_the_one_this_test_follows`` keeps the two in step.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import sqlite3
import threading
from pathlib import Path

import httpx
import pytest

from tasks.config import DEPLOY_DAG_ID, DRIFT_DAG_ID, Settings, training_dag_id
from tasks.datagen import DriftKnob, generate, publish_drop
from tasks.dataset_spec import load_spec
from tasks.layout import DayLayout
from tests.dag_runs import discard_queued_runs, queued_runs, run_dag
from tests.traffic import log_scored_traffic

pytestmark = pytest.mark.integration

NETWORK, FLOWS = "network_security", "intrusion_flows"
NETWORK_MODEL = "ns_datasets_test"  # network_security's model in this module; intrusion_flows' is its name
MODELS = {NETWORK: NETWORK_MODEL, FLOWS: FLOWS}
SPECS = {name: load_spec(name) for name in MODELS}
ROWS = {NETWORK: 1200, FLOWS: 600}
FIRST, SECOND = "2026-07-01", "2026-07-02"
FORCE = {"force_gate": "promote", "force_reason": "datasets test: ship a second version"}
README = Path(__file__).resolve().parents[2] / "README.md"
SEEDS = {(NETWORK, FIRST): 101, (FLOWS, FIRST): 102, (FLOWS, SECOND): 103}
# The commands of the README's "Add a dataset" section, in order; each test below does one the same way.
README_STEPS = [
    "make suites",
    'make publish-drop DS=<ds> ARGS="--dataset <name>"',
    "airflow dags test <name>_training <ds>",
    'curl -s -H "X-API-Key: $NS_SERVING_API_KEY" http://127.0.0.1:8000/models/<name>',
    'curl -s -H "X-API-Key: $NS_SERVING_API_KEY" -H "Content-Type: application/json" '
    "-d @record.json http://127.0.0.1:8000/models/<name>/predict",
    "airflow dags test network_security_drift <hour>",
    "aws s3 cp verdicts.csv s3://network-security-raw/<feedback prefix>/ds=<ds>/verdicts.csv",
]


@pytest.fixture(scope="module", autouse=True)
def own_model_name():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NS_MODEL_NAME", NETWORK_MODEL)
        # The EC2 path per model is checked on moto in tests/tasks/test_delivery.py; here the local server.
        patch.setenv("NS_DEPLOY_TARGETS", "local")
        yield


def layout(dataset: str, ds: str) -> DayLayout:
    return DayLayout(Settings(dataset=dataset), SPECS[dataset], ds)


def train(s3, dataset: str, ds: str, conf: dict | None = None):
    publish_drop(s3, layout(dataset, ds), rows=ROWS[dataset], seed=SEEDS[dataset, ds])  # make publish-drop
    return run_dag(training_dag_id(dataset), ds, conf=conf)


def records(dataset: str, count: int, seed: int) -> list[dict]:
    spec = SPECS[dataset]
    return json.loads(generate(spec, count, seed=seed).drop(columns=[spec.target.name]).to_json(orient="records"))


@pytest.fixture(scope="module")
def client(local_stack):
    with httpx.Client(
        base_url=f"http://127.0.0.1:{local_stack['SERVING_PORT']}",
        headers={"X-API-Key": local_stack["NS_SERVING_API_KEY"]},
        timeout=30,
    ) as http:
        yield http


def served_version(client, dataset: str) -> str:
    return client.get(f"/models/{MODELS[dataset]}").json()["model_version"]


@pytest.fixture(scope="module")
def both_served(s3, local_stack, client):
    """Each dataset trained by its own DAG and shipped to the one local server, network_security first."""
    reports = {dataset: train(s3, dataset, FIRST) for dataset in (NETWORK, FLOWS)}
    for dataset, report in reports.items():
        assert report.succeeded, (dataset, report.task_states)
        assert report.dag_id == training_dag_id(dataset)
    return reports


def test_its_suite_is_the_one_make_suites_writes():
    from tasks.validate import build_suite, load_suite_json

    assert load_suite_json(SPECS[FLOWS]) == build_suite(SPECS[FLOWS])


def test_each_dataset_is_trained_by_its_own_dag_and_served_beside_the_other(both_served, client):
    network, flows = both_served[NETWORK], both_served[FLOWS]
    assert (network.dag_id, flows.dag_id) == ("network_security_training", "intrusion_flows_training")
    assert flows.outputs["plan_run"]["dataset"] == FLOWS and flows.outputs["plan_run"]["model_name"] == FLOWS
    # The second deploy added its model to the running server: no restart, the first one still served.
    assert flows.outputs["release.deploy_candidate"]["local"]["process"] == "running"
    listed = {m["model_name"] for m in client.get("/models").json()["models"]}
    assert {NETWORK_MODEL, FLOWS} <= listed
    for dataset, report in both_served.items():
        version = report.outputs["release.complete"]["champion_version"]
        detail = client.get(f"/models/{MODELS[dataset]}").json()
        assert (detail["model_name"], detail["model_version"], detail["dataset"]) == (MODELS[dataset], version, dataset)
        answer = client.post(f"/models/{MODELS[dataset]}/predict", json=records(dataset, 1, seed=3)[0])
        assert answer.status_code == 200, answer.text
        assert (answer.json()["model_name"], answer.json()["model_version"]) == (MODELS[dataset], version)
        assert report.outputs["release.complete"]["outcome"] == "completed"
    # A record of one dataset is no request of the other's model.
    assert client.post(f"/models/{FLOWS}/predict", json=records(NETWORK, 1, seed=3)[0]).status_code == 422


BODIES = 200


class Traffic(threading.Thread):
    """A client sending to both models in turn until stopped; every answer is kept.

    Enough of it, and varied enough, for the canary to judge: its 50 % step compares the two
    versions' 10-bin score histograms (PSI), and on about 25 requests per side cycling through 20
    records that histogram is mostly noise (PSI 1.0 and 2.6 seen between two versions trained
    alike, so the release aborted now and then). 200 records and a short pause give each side
    some hundred requests in the 6 s bake."""

    def __init__(self, base_url: str, api_key: str) -> None:
        super().__init__(daemon=True)
        self.base_url, self.api_key = base_url, api_key
        self.stopped = threading.Event()
        self.answers: dict[str, list[tuple[int, str | None]]] = {NETWORK: [], FLOWS: []}
        self.bodies = {dataset: records(dataset, BODIES, seed=11) for dataset in MODELS}

    def run(self) -> None:
        with httpx.Client(base_url=self.base_url, headers={"X-API-Key": self.api_key}, timeout=30) as http:
            sent = 0
            while not self.stopped.is_set():
                for dataset, model in MODELS.items():
                    response = http.post(f"/models/{model}/predict", json=self.bodies[dataset][sent % BODIES])
                    version = response.json().get("model_version") if response.status_code == 200 else None
                    self.answers[dataset].append((response.status_code, version))
                sent += 1
                self.stopped.wait(0.005)


def test_a_release_and_a_rollback_of_one_leave_the_other_unchanged(both_served, s3, client, local_stack):
    network_version = served_version(client, NETWORK)
    flows_first = served_version(client, FLOWS)
    traffic = Traffic(str(client.base_url), local_stack["NS_SERVING_API_KEY"])
    traffic.start()
    try:
        released = train(s3, FLOWS, SECOND, conf=FORCE)
        assert released.succeeded, released.task_states
        flows_second = released.outputs["release.complete"]["champion_version"]
        assert flows_second != flows_first and served_version(client, FLOWS) == flows_second
        assert served_version(client, NETWORK) == network_version

        rolled = run_dag(DEPLOY_DAG_ID, SECOND, conf={"action": "rollback", "reason": "test", "dataset": FLOWS})
        assert rolled.succeeded, rolled.task_states
        assert served_version(client, FLOWS) == flows_first
    finally:
        traffic.stopped.set()
        traffic.join(timeout=60)
    network, flows = traffic.answers[NETWORK], traffic.answers[FLOWS]
    assert len(network) > 20 and len(flows) > 20
    assert {status for status, _ in network + flows} == {200}  # every request answered
    assert {version for _, version in network} == {network_version}  # never touched
    versions = [version for _, version in flows]
    assert set(versions) == {flows_first, flows_second}
    assert versions[0] == versions[-1] == flows_first and flows_second in versions
    assert served_version(client, NETWORK) == network_version


def test_drift_on_one_dataset_triggers_one_training_run_of_that_dataset_only(both_served, s3, local_stack):
    champion = {dataset: served for dataset, served in ((d, _champion(d)) for d in MODELS)}
    hour = dt.datetime(2026, 7, 2, 14, tzinfo=dt.UTC)
    log_scored_traffic(
        s3, local_stack["MLFLOW_TRACKING_URI"], SPECS[FLOWS], FLOWS, champion[FLOWS], hour, rows=400, seed=7,
        knob=DriftKnob(feature_drift=1.0),
    )  # fmt: skip
    for dag_id in (training_dag_id(NETWORK), training_dag_id(FLOWS)):
        discard_queued_runs(dag_id)

    report = run_dag(DRIFT_DAG_ID, hour + dt.timedelta(hours=1))  # no conf: every dataset with a champion

    assert report.succeeded, report.task_states
    assert report.task_states[f"check_drift[{FLOWS}]"] == "success"
    assert report.outputs[f"decide_retraining[{FLOWS}]:decision"]["outcome"] == "retrain"
    assert report.task_states[f"trigger_retraining[{FLOWS}]"] == "success"
    # network_security's own check ran beside it (no traffic of its own in the window: skipped).
    assert report.task_states[f"check_drift[{NETWORK}]"] == "skipped"
    assert report.task_states[f"trigger_retraining[{NETWORK}]"] == "skipped"
    (run,) = queued_runs(training_dag_id(FLOWS))
    assert run["run_id"] == "drift__intrusion_flows__2026-07-02T15:00:00"
    assert run["conf"]["dataset"] == FLOWS and run["conf"]["signals"] == ["drift"]
    assert [r for r in queued_runs(training_dag_id(NETWORK)) if r["run_id"].startswith("drift__")] == []
    with sqlite3.connect(local_stack["NS_MONITORING_DB"]) as db:
        retrains = db.execute("SELECT model_name FROM retrain_log WHERE window_end LIKE '2026-07-02%'").fetchall()
        checks = dict(db.execute("SELECT model_name, decision FROM drift_check WHERE dag_run_id = ?", (report.run_id,)))
    assert retrains == [(FLOWS,)]  # the cooldown starts for intrusion_flows only
    assert checks == {FLOWS: "retrain", NETWORK_MODEL: "skipped"}
    assert {d: _champion(d) for d in MODELS} == champion  # nothing promoted by a check
    discard_queued_runs(training_dag_id(FLOWS))


def _champion(dataset: str) -> str:
    from mlflow import MlflowClient

    from tasks.tracking import CHAMPION, alias_version

    return alias_version(MlflowClient(), MODELS[dataset], CHAMPION)


def test_feedback_for_the_new_dataset_joins_its_own_predictions(both_served, s3, client, local_stack):
    """Delayed labels uploaded to the spec's feedback prefix (the README's `aws s3 cp`) label its model's answers."""
    from tasks.feedback import labelled_window

    spec, ds = SPECS[FLOWS], "2026-07-03"
    sent = records(FLOWS, 30, seed=21)
    answers = [client.post(f"/models/{FLOWS}/predict", json=record).json() for record in sent]
    started = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    rows = "".join(f"{a['request_id']},{a['label']},{ds}T10:00:00Z\n" for a in answers)
    key = f"{spec.feedback.prefix}/ds={ds}/verdicts.csv"  # aws s3 cp verdicts.csv s3://<raw>/<prefix>/ds=<ds>/
    s3.put_object(Bucket=Settings().raw_bucket, Key=key, Body=f"request_id,is_attack,labelled_at\n{rows}".encode())
    import time

    deadline = time.monotonic() + 60
    while True:
        window = labelled_window(
            s3, raw_bucket=Settings().raw_bucket, lake_bucket=Settings().lake_bucket, spec=spec, model_name=FLOWS,
            feedback_days=[ds], predictions_from=started, predictions_to=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1),
        )  # fmt: skip
        if window.counts.labelled_rows == len(answers) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert window.counts.labelled_rows == len(answers) and window.counts.unknown_request_ids == 0
    assert set(window.frame["model_name"]) == {FLOWS}


def test_the_readme_section_is_the_one_this_test_follows():
    """The README's "Add a dataset" commands are the steps this module takes, in this order, word for word."""
    section = README.read_text().split("## Add a dataset", 1)[1].split("\n## ", 1)[0]
    commands = [m.strip() for m in re.findall(r"^\$ (.+)$", section, flags=re.MULTILINE)]
    assert commands == README_STEPS
