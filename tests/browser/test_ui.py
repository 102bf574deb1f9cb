"""The Airflow UI as a person uses it, in headless Chromium (Playwright).

A private instance (the session's state folder under /tmp and free ports, see
tests/conftest.py) runs ``scripts.airflow_ui up``: the stack and ``airflow standalone``.
With a day's drop published, the test logs in, finds the DAGs, triggers the training DAG
through the trigger dialog's Params form, waits for the run to succeed, opens the Graph
view and the ``train`` task's details, and follows the "MLflow run" extra link to the
MLflow UI page of that run. A screenshot of each step goes to ``test-artifacts/browser/``.

Run with ``python -m pytest -m browser`` (deselected otherwise, see conftest.py). Needs
Chromium: ``/usr/bin/chromium`` (Debian's package) or ``NS_CHROMIUM=/path/to/chrome``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest

from scripts import airflow_ui, services, stack
from tasks.config import DRIFT_DAG_ID, TRAINING_DAG_ID, Settings
from tasks.datagen import publish_drop
from tasks.dataset_spec import load_spec
from tasks.layout import DayLayout
from tasks.supervisor import OWNER_VARIABLE
from tests.conftest import PATHS, PORTS, STACK_ENV, _free_port

pytestmark = pytest.mark.browser

DS = "2026-06-15"
ROWS = 1500
ARTIFACTS = services.PROJECT_ROOT / "test-artifacts" / "browser"
BUDGET = 8 * 60  # the whole test, start-up and tear-down included
UI = airflow_ui.ui_url(PORTS)


class Budget:
    """Seconds left of the test's budget; every wait takes what it needs from it, never more."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self, at_most: float) -> float:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"the browser test ran out of its {BUDGET}s budget")
        return min(at_most, remaining)

    def ms(self, at_most: float) -> float:
        return self.left(at_most) * 1000


def _chromium() -> str:
    found = os.environ.get("NS_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.fail("the browser test needs Chromium: apt-get install chromium, or set NS_CHROMIUM")
    return found


def _our_processes() -> list[psutil.Process]:
    """Processes started for this session's stack (they carry its stack id in their environment)."""
    ours = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(OWNER_VARIABLE) == str(PATHS.state_dir):
                ours.append(process)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return ours


@pytest.fixture(scope="module")
def budget() -> Budget:
    return Budget(BUDGET)


@pytest.fixture(scope="module")
def airflow(budget):
    """``scripts.airflow_ui up`` on the session's private stack; ``down`` afterwards, and nothing left running."""
    environ = {
        **os.environ,
        # The UI's log servers must not meet another Airflow's (8793 and 8794 by default).
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(_free_port()),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(_free_port()),
        # The model plane is under test here, not delivery (a promotion ships nowhere).
        "NS_DEPLOY_TARGETS": "",
    }
    try:
        env = airflow_ui.up(PATHS, PORTS, environ=environ)
        yield env
    finally:
        stack.down(PATHS, PORTS)
        left = [f"{p.pid} {' '.join(p.cmdline()[:3])}" for p in _our_processes()]
        assert not left, f"processes left behind by airflow_ui down: {left}"


@pytest.fixture(scope="module")
def api(airflow):
    """GET on the REST API with the admin's token."""
    client = airflow_ui.api(PATHS, PORTS)

    def get(path: str) -> Any:
        return client.request("GET", path.removeprefix("/api/v2"))

    return get


@pytest.fixture(scope="module")
def drop(airflow):
    return publish_drop(
        services.s3_client(STACK_ENV), DayLayout(Settings(), load_spec("network_security"), DS), rows=ROWS, parts=2
    )


@pytest.fixture(scope="module")
def browser():
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=_chromium(), headless=True, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def shots():
    """``shots(page, name)`` saves a numbered full-page screenshot in test-artifacts/browser/."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*.png"):
        old.unlink()
    taken: list[Path] = []

    def shot(page: Any, name: str) -> Path:
        path = ARTIFACTS / f"{len(taken) + 1:02d}-{name}.png"
        page.screenshot(path=str(path), full_page=True)
        taken.append(path)
        return path

    return shot


def _quoted(run_id: str) -> str:
    return urllib.parse.quote(run_id, safe="")


def _wait_for_run(api, run_id: str, budget: Budget) -> dict:
    """Poll the run until it ends; fail with its task states if it does not succeed."""
    path = f"/api/v2/dags/{TRAINING_DAG_ID}/dagRuns/{_quoted(run_id)}"
    deadline = time.monotonic() + budget.left(330)
    while True:
        run = api(path)
        if run["state"] in ("success", "failed") or time.monotonic() > deadline:
            break
        time.sleep(5)
    if run["state"] != "success":
        tasks = api(f"{path}/taskInstances?limit=100")["task_instances"]
        states = ", ".join(f"{t['task_id']}={t['state']}" for t in tasks)
        pytest.fail(f"run {run_id} is {run['state']}, not success ({states}); logs: {PATHS.airflow_home / 'logs'}")
    return run


def _wait_until(check, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {seconds:.0f}s in vain until {what}")
        time.sleep(1)


def _xcom(api, run_id: str, task_id: str, key: str) -> Any:
    path = f"/api/v2/dags/{TRAINING_DAG_ID}/dagRuns/{_quoted(run_id)}/taskInstances/{task_id}/xcomEntries/{key}"
    return api(f"{path}?deserialize=true&stringify=false")["value"]


def test_trigger_training_from_the_ui_and_follow_the_mlflow_link(budget, airflow, api, drop, browser, shots, capsys):
    from playwright.sync_api import expect

    assert len(drop) == 2
    # A second `up` finds everything running and starts nothing.
    standalone = airflow_ui.service(PORTS)
    pid = PATHS.supervisor().pid(standalone)
    airflow_ui.up(PATHS, PORTS)
    assert "already running" in capsys.readouterr().out and PATHS.supervisor().pid(standalone) == pid

    context = browser.new_context(viewport={"width": 1440, "height": 900})
    page = context.new_page()
    page.set_default_timeout(budget.ms(60))
    expect.set_options(timeout=budget.ms(60))

    # 1. Log in with the admin password `up` printed.
    user, password = airflow_ui.login(PATHS)
    page.goto(UI + "/")
    page.wait_for_url("**/auth/login**")
    page.get_by_label("Username").fill(user)
    page.get_by_label("Password").fill(password)
    shots(page, "login")
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(UI + "/")

    # 2. Both DAGs in the DAG list.
    page.goto(UI + "/dags")
    for dag_id in (TRAINING_DAG_ID, DRIFT_DAG_ID):
        expect(page.get_by_test_id("dag-id").filter(has_text=dag_id)).to_be_visible()
    shots(page, "dag-list")

    # 3. Trigger the training DAG through the dialog's Params form, for the published day.
    page.goto(f"{UI}/dags/{TRAINING_DAG_ID}")
    page.get_by_test_id("trigger-dag-button").click()
    dialog = page.get_by_role("dialog")
    expect(dialog.get_by_text("Run Parameters")).to_be_visible()
    dialog.locator("#element_ds").fill(DS)
    expect(dialog.locator("#element_ds")).to_have_value(DS)
    # `up` paused the DAG: the dialog offers to unpause it, ticked by default.
    expect(dialog.get_by_text(f"Unpause {TRAINING_DAG_ID} on trigger")).to_be_visible()
    expect(dialog.get_by_role("checkbox")).to_be_checked()
    shots(page, "trigger-dialog")
    with page.expect_response(lambda r: r.url.endswith("/dagRuns") and r.request.method == "POST") as posted:
        dialog.get_by_test_id("trigger-dag-submit").click()
    created = posted.value.json()
    assert posted.value.ok, created
    run_id = created["dag_run_id"]
    assert created["conf"]["ds"] == DS
    page.wait_for_url(f"**/dags/{TRAINING_DAG_ID}/runs/**")
    shots(page, "run-triggered")
    _wait_until(lambda: api(f"/api/v2/dags/{TRAINING_DAG_ID}")["is_paused"] is False, 15, "the DAG is unpaused")

    # 4. The run succeeds (REST API, polled).
    _wait_for_run(api, run_id, budget)
    page.goto(f"{UI}/dags/{TRAINING_DAG_ID}/runs/{_quoted(run_id)}")
    expect(page.get_by_text("Success").first).to_be_visible()

    # 5. The Graph view of the run.
    page.get_by_role("button", name="Show Graph (Press g)").click()
    train_node = page.get_by_test_id("rf__node-train")
    expect(train_node).to_be_visible()
    expect(train_node).to_contain_text("success")
    shots(page, "graph")

    # 6. The train task's details: the "MLflow run" extra link.
    train_node.get_by_role("link", name="train").click()
    page.wait_for_url("**/runs/**/tasks/train")
    page.locator('a[href$="/tasks/train/details"]').click()
    link = page.get_by_role("link", name="MLflow run")
    expect(link).to_be_visible()
    shots(page, "train-details")

    # 7. Following it lands on the MLflow UI page of the run the train task logged.
    experiment_id = _xcom(api, run_id, "train", "experiment_id")
    mlflow_run_id = _xcom(api, run_id, "train", "run_id")
    expected = f"http://127.0.0.1:{PORTS.mlflow}/#/experiments/{experiment_id}/runs/{mlflow_run_id}"
    expect(link).to_have_attribute("href", expected)
    with context.expect_page(timeout=budget.ms(30)) as opened:
        link.click()
    mlflow = opened.value
    mlflow.wait_for_load_state("load", timeout=budget.ms(60))
    assert mlflow.url == expected
    expect(mlflow.get_by_text(mlflow_run_id).first).to_be_visible(timeout=budget.ms(60))
    expect(mlflow.get_by_text(f"train {DS}").first).to_be_visible()  # the run's name
    shots(mlflow, "mlflow-run")
    with urllib.request.urlopen(
        f"{STACK_ENV['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/runs/get?run_id={mlflow_run_id}"
    ) as r:
        tags = {t["key"]: t["value"] for t in json.load(r)["run"]["data"]["tags"]}
    assert (tags["airflow_run_id"], tags["ds"]) == (run_id, DS)
    context.close()
