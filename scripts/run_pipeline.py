"""``make run``: the whole closed loop on the embedded stack, stage by stage.

1. start the stack; publish day D's drop; run ``network_security_training`` (ingest →
   validate → transform → candidates side by side → train → gate → deploy): the champion serves on 127.0.0.1:8000;
2. send normal traffic to the served model; run ``network_security_drift``: no drift;
3. publish a drifted day D+1 and send drifted traffic; run the drift DAG again: it
   triggers a training run, which is then executed (``dag.test()`` of the queued run with
   its conf), promotes and deploys a new champion;
4. send drifted traffic to the new champion; a last drift check finds no drift against
   its reference (the drifted snapshot it was trained on);
5. a deliberately bad release: a forced challenger whose candidate answers 5xx (the documented,
   off-by-default fault injection, switched on for ``make run``) is aborted at its first canary
   step and rolled back automatically while the champion keeps serving;
6. print a table of every DAG run, PSI, decisions, each release's stages (shadow agreement,
   each canary step's metrics), champion versions and report locations.

Every training run that releases does so under live traffic (a background client), so its
shadow and canary stages are judged on evidence.

Then the concept-drift stage (``ConceptLoop``): traffic whose labels mean something else given
the same features (PSI stays below the threshold, the drift check sees nothing), its delayed
labels as a feedback drop, ``network_security_quality`` catching the drop in live quality and
triggering one retrain on the feedback, and the new champion's live quality recovering; the
table gets a quality column (metric before -> after, labelled rows).

What it prints comes from where the runs recorded it: the monitoring store (gate decisions,
deployments, drift checks, triggered retrains), MLflow, the S3 manifests, and Airflow's CLI
(task states, queued runs), never from Airflow's database directly.

Usage: ``python -m scripts.run_pipeline [--ds YYYY-MM-DD] [--rows N] [--traffic N] [--no-loop]``
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from typing import Any

from scripts import bootstrap, services
from scripts.services import PROJECT_ROOT, Paths
from tasks.supervisor import SupervisorError

SAMPLE = PROJECT_ROOT / "include" / "samples" / "network_security_record.json"


def _say(step: str) -> None:
    print(f"\n==> {step}", flush=True)


class Records:
    """What the runs recorded: the monitoring store (through the Airflow connection the DAGs use), MLflow, S3."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self._store: Any = None

    @property
    def store(self) -> Any:
        if self._store is None:
            from airflow.sdk import BaseHook

            from tasks.monitoring_store import HookStore

            conn_id = self.settings.monitoring_conn_id
            # Outside a task, hooks resolve connections from the environment only: hand them the
            # one Airflow's metadata DB holds, read with the public CLI.
            (connection,) = services.airflow_json("connections", "get", conn_id)
            os.environ[f"AIRFLOW_CONN_{conn_id.upper()}"] = connection["get_uri"]
            self._store = HookStore(BaseHook.get_connection(conn_id).get_hook())
        return self._store

    def of_run(self, query: str, run_id: str) -> list[dict[str, Any]]:
        from tasks import monitoring_store

        return monitoring_store.rows_of_run(self.store, query, run_id)

    def promotion(self, run_id: str) -> dict[str, Any] | None:
        rows = self.of_run("promotions_of_run", run_id)
        return rows[0] if rows else None

    def drift_check(self, run_id: str, dataset: str) -> dict[str, Any] | None:
        """The check of ``dataset`` in a drift run (the DAG checks every dataset with a champion)."""
        rows = [row for row in self.of_run("drift_check_of_run", run_id) if row["dataset"] == dataset]
        return rows[0] if rows else None

    def latest(self, name: str) -> list[dict[str, Any]]:
        from tasks import monitoring_store

        return monitoring_store.query(self.store, name)

    def retrain_conf(self, run_id: str) -> dict[str, Any] | None:
        from tasks import monitoring_store

        request = monitoring_store.retrain_request(self.store, run_id)
        return request["conf"] if request else None

    def report_url(self, dag_run_id: str) -> str | None:
        """The Evidently report of a drift run, served by MLflow (its monitoring run's artifact)."""
        import mlflow

        from tasks.drift import load_drift_config
        from tasks.storage import mlflow_artifact_url

        tracking = self.settings.mlflow_tracking_uri
        mlflow.set_tracking_uri(tracking)
        runs = mlflow.search_runs(
            experiment_names=[load_drift_config().monitoring_experiment],
            filter_string=f"tags.airflow_dag_run_id = '{dag_run_id}'",
            output_format="list",
        )
        return mlflow_artifact_url(tracking, runs[0].info.run_id, "drift/report.html") if runs else None


class LiveTraffic:
    """Small batches sent to the served model on a background thread while a training run releases:
    its shadow and canary stages are judged on live traffic (nothing is sent when nothing is served).
    It follows the loop's current traffic (``Loop.knob``: drifted once the drift was published), so
    the drift checks' windows hold the traffic the stage described."""

    def __init__(self, loop: Loop | None) -> None:
        import threading

        self.loop, self.stop, self.thread = loop, threading.Event(), None

    def _releasing(self) -> bool:
        import httpx

        model = self.loop.settings.model_name or self.loop.settings.dataset
        try:
            state = httpx.get(
                f"{self.loop.url}/admin/models/{model}/release",
                headers={"X-API-Key": os.environ.get("NS_SERVING_ADMIN_API_KEY", "")},
                timeout=5,
            )
            return state.status_code == 200 and state.json().get("state") == "running"
        except (httpx.HTTPError, ValueError):
            return False

    def _send(self) -> None:
        from tasks.traffic import send_traffic

        seed = 1000
        while not self.stop.is_set():
            if not self._releasing():  # no release yet (the run still trains): leave the cores to it
                time.sleep(0.5)
                continue
            try:
                loop = self.loop
                send_traffic(loop.url, loop.api_key, loop.spec, 40, seed=seed, knob=loop.knob, batch_size=2)
            except Exception:  # noqa: BLE001 - the server restarting or refusing: try again shortly
                time.sleep(0.5)
            seed += 1

    def __enter__(self) -> LiveTraffic:
        import threading

        if self.loop is not None and served_version(self.loop.url, self.loop.api_key):
            self.thread = threading.Thread(target=self._send, name="live-traffic", daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(30)


def release_lines(deployments: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The release's stages as the deployment log recorded them (local target's row: the served metrics)."""
    rows = [r for r in deployments if r["action"] in ("release", "rollback") and r["detail"].startswith("{")]
    row = next((r for r in rows if r["target"] == "local"), rows[0] if rows else None)
    if row is None:
        return []
    detail = json.loads(row["detail"])
    if detail.get("outcome") == "aborted":
        metrics = detail.get("metrics") or {}
        shown = ", ".join(
            f"{k} {v}"
            for k, v in metrics.items()
            if k in ("candidate_requests", "candidate_5xx", "candidate_5xx_rate", "candidate_p99_ms")
        )
        return [(f"release ABORTED at {detail['stage']}", "; ".join(detail.get("reasons") or [])),
                ("  metrics that tripped", shown), ("  rolled back", json.dumps(detail.get("targets")))]  # fmt: skip
    lines = []
    stages = detail.get("metrics") or {}
    order = sorted(stages, key=lambda name: (name != "shadow", int(name.rsplit("_", 1)[-1]) if "_" in name else 0))
    for stage, verdict in ((name, stages[name]) for name in order):
        metrics, status = (verdict or {}).get("metrics") or {}, (verdict or {}).get("status")
        if stage == "shadow" and "agreement" in metrics:
            text = f"{status}: agreement {metrics['agreement']}, score PSI {metrics['score_psi']}, " \
                f"p99 {metrics['candidate_p99_ms']} ms, {metrics['shadowed_rows']} rows"  # fmt: skip
        elif "candidate_requests" in metrics:
            text = f"{status}: {metrics['candidate_requests']} requests, 5xx {metrics['candidate_5xx']}, " \
                f"p99 {metrics['candidate_p99_ms']} ms (baseline {metrics['baseline_p99_ms']}), PSI {metrics['score_psi']}"  # fmt: skip
        else:
            text = f"{status}: {'; '.join((verdict or {}).get('reasons') or [])}"
        lines.append((f"release {stage}", text))
    return lines


def champion_after(promotion: dict[str, Any]) -> str | None:
    """The champion once a gate decision is applied."""
    promoted = promotion["decision"] in ("promote", "forced_promote")
    return promotion["model_version"] if promoted else promotion["champion_version"]


def served_version(url: str, api_key: str) -> str | None:
    """The version the local model server answers with, or None when it does not answer."""
    import httpx

    try:
        response = httpx.get(f"{url}/model", headers={"X-API-Key": api_key}, timeout=5)
    except httpx.HTTPError:
        return None
    return response.json().get("model_version") if response.status_code == 200 else None


class Loop:
    """The closed loop's state: what ran, what it decided, and how to print it."""

    def __init__(self, paths: Paths, args: argparse.Namespace) -> None:
        from tasks.dataset_spec import load_spec

        self.paths = paths
        self.args = args
        self.settings = bootstrap.configured_settings(dict(os.environ))
        self.spec = load_spec(self.settings.dataset)
        self.records = Records(self.settings)
        self.url = f"http://127.0.0.1:{os.environ['SERVING_PORT']}"
        self.api_key = os.environ["NS_SERVING_API_KEY"]
        self.rows: list[dict[str, Any]] = []  # the final table
        self.knob: Any = None  # the traffic's drift (None: normal), followed by the releases' live traffic
        self.started = time.monotonic()

    # --- helpers -------------------------------------------------------------------------

    def log_path(self, name: str) -> Any:
        return self.paths.logs / f"{name}.log"

    def run(self, dag_id: str, when: Any, conf: dict | None = None, note: str = "", shown_as: str = "") -> Any:
        from scripts.dag_runner import run_dag, task_states
        from tasks.config import TRAINING_DAG_ID

        began = time.monotonic()
        with LiveTraffic(self if dag_id == TRAINING_DAG_ID else None):
            report = run_dag(dag_id, when, conf=conf, log_path=self.log_path(dag_id))
        report.task_states = task_states(dag_id, report.run_id)
        self.record(dag_id, report, note, time.monotonic() - began, shown_as)
        return report

    def record(self, dag_id: str, report: Any, note: str, seconds: float, shown_as: str = "") -> None:
        from tasks.config import DRIFT_DAG_ID

        row = {"dag": dag_id, "run": shown_as or report.run_id, "state": report.state, "seconds": seconds, "note": note}
        if shown_as:
            row["ran_as"] = report.run_id
        if record_quality(self.records, dag_id, report.run_id, self.spec.name, row):
            pass  # the quality columns are filled in
        elif dag_id == DRIFT_DAG_ID:
            check = self.records.drift_check(report.run_id, self.spec.name)
            if check and check["max_psi"] is not None:
                row["psi"] = f"max {check['max_psi']:.3f} / pred {check['prediction_psi']:.3f}"
                row["report"] = self.records.report_url(report.run_id) or check["report_uri"]
            if check:
                triggered = f" -> {check['triggered_run_id']}" if check["triggered_run_id"] else ""
                skipped = " (too few rows)" if check["decision"] == "skipped" else ""
                row["decision"] = check["decision"] + skipped + triggered
                row["check"] = check
        else:
            promotion = self.records.promotion(report.run_id)
            if promotion:
                row["decision"] = f"gate {promotion['decision']}"
                row["champion"] = f"v{promotion['champion_version'] or '-'} -> v{champion_after(promotion)}"
                row["promotion"] = promotion
            row["release"] = release_lines(self.records.of_run("deployments_of_run", report.run_id))
        self.rows.append(row)
        for task_id, state in report.task_states.items():
            print(f"  {task_id:28s} {state}")
        print(f"  -> {report.state} in {seconds:.0f}s" + (f"; {row.get('decision')}" if row.get("decision") else ""))

    def traffic(self, rows: int, seed: int, knob: Any = None, label: str = "normal") -> None:
        from tasks.traffic import send_traffic, wait_until_logged

        version = served_version(self.url, self.api_key)
        sent = send_traffic(self.url, self.api_key, self.spec, rows, seed=seed, knob=knob)
        stats = wait_until_logged(self.url)
        print(
            f"  {sent} {label} records scored by v{version}; prediction log: "
            f"{stats.get('prediction_log_written', 0):.0f} written, {stats.get('prediction_log_dropped', 0):.0f} dropped"
        )

    def publish(self, ds: str, knob: Any = None) -> None:
        import boto3

        from tasks.datagen import publish_drop
        from tasks.layout import DayLayout

        layout = DayLayout(self.settings, self.spec, ds)
        for uri in publish_drop(boto3.client("s3"), layout, self.args.rows, parts=self.args.parts, knob=knob):
            print(f"  {uri}")

    def ensure_served(self, report: Any, ds: str) -> None:
        """The gate kept the champion (no deploy ran) and it is not being served: redeploy it."""
        from tasks.config import DEPLOY_DAG_ID

        promotion = self.rows[-1].get("promotion")
        champion = champion_after(promotion) if promotion else None
        if report.succeeded and champion and served_version(self.url, self.api_key) != champion:
            _say(f"The champion v{champion} is not being served: running {DEPLOY_DAG_ID} (redeploy)")
            self.run(DEPLOY_DAG_ID, ds, conf={"action": "redeploy"}, note="redeploy the kept champion")

    # --- stages --------------------------------------------------------------------------

    def train_first(self) -> Any:
        from tasks.config import TRAINING_DAG_ID

        _say(f"[1/7] Publishing the {self.args.ds} drop of {self.settings.dataset}: {self.args.rows} rows")
        self.publish(self.args.ds)
        _say(f"[1/7] Running {TRAINING_DAG_ID} for ds={self.args.ds} (logs: {self.log_path(TRAINING_DAG_ID)})")
        report = self.run(TRAINING_DAG_ID, self.args.ds, note="daily run")
        print_training_summary(self, report, self.args.ds)
        self.ensure_served(report, self.args.ds)
        return report

    def run_queued_retrains(self, drifted_day: str) -> None:
        """Execute the training runs the drift check queued, with the conf it logged for them.

        Chosen path: ``dag.test()`` as it is (scripts/dag_runner.py), which runs the queued run's
        conf as a ``manual__`` run at the same logical date. Keeping the ``drift__`` id would take
        a scheduler; ``make run`` has none (everything runs in this process, on SQLite), while
        ``make airflow`` and the distributed mode have one and execute the queued run as it is.
        """
        from scripts.dag_runner import queued_runs
        from tasks.config import TRAINING_DAG_ID

        for queued in queued_runs(TRAINING_DAG_ID):
            conf = self.records.retrain_conf(queued["run_id"])
            if conf is None:
                print(f"  {queued['run_id']}: queued, but not by a drift check of this stack; left alone")
                continue
            report = self.run(
                TRAINING_DAG_ID,
                queued["logical_date"],
                conf=conf,
                note=f"queued by a check as {queued['run_id']}",
                shown_as=queued["run_id"],
            )
            for reason in (self.rows[-1].get("promotion") or {}).get("reason", "").split("; "):
                if reason:
                    print(f"  gate: {reason}")
            self.ensure_served(report, drifted_day)

    def loop(self) -> bool:
        from tasks.config import DRIFT_DAG_ID, TRAINING_DAG_ID
        from tasks.datagen import DriftKnob

        drifted_day = (dt.date.fromisoformat(self.args.ds) + dt.timedelta(days=1)).isoformat()
        knob = DriftKnob(feature_drift=1.0)
        before = served_version(self.url, self.api_key)
        self.champions = (before, None)

        _say(f"[2/7] Normal traffic to the champion v{before} at {self.url}")
        self.traffic(self.args.traffic, seed=101)
        _say(f"[2/7] Running {DRIFT_DAG_ID}: the window holds normal traffic")
        self.run(DRIFT_DAG_ID, _now(), note="normal traffic")

        _say(f"[3/7] Publishing a drifted day ({drifted_day}) and sending drifted traffic")
        self.publish(drifted_day, knob)
        self.knob = knob
        self.traffic(self.args.traffic, seed=102, knob=knob, label="drifted")
        _say(f"[3/7] Running {DRIFT_DAG_ID}: the window now holds drifted traffic")
        self.run(DRIFT_DAG_ID, _now(), note="drifted traffic")
        decision = self.rows[-1].get("check") or {}
        if decision.get("decision") == "cooldown":
            # An earlier make run retrained minutes ago: storm protection holds this drift back.
            print(f"  {decision['reason']}: the storm protection of an earlier run.")
            _say(f"[3/7] Running {DRIFT_DAG_ID} again with the run param cooldown_minutes=0, to show the loop")
            self.run(DRIFT_DAG_ID, _now(), conf={"cooldown_minutes": 0}, note="drifted traffic, no cooldown")
        if not (self.rows[-1].get("check") or {}).get("triggered_run_id"):
            print("  the drift check did not trigger a training run; see the table below")
            return False

        _say(f"[4/7] Executing the triggered {TRAINING_DAG_ID} run (logs: {self.log_path(TRAINING_DAG_ID)})")
        self.run_queued_retrains(drifted_day)
        after = served_version(self.url, self.api_key)

        _say(f"[5/7] Drifted traffic to the new champion v{after}; a last drift check")
        self.traffic(self.args.traffic, seed=103, knob=knob, label="drifted")
        self.run(DRIFT_DAG_ID, _now(), note="drifted traffic, new champion")
        self.champions = (before, after)
        return after is not None and after != before

    def bad_release(self) -> bool:
        """A forced challenger whose candidate fails half its answers: aborted at the first canary step."""
        from tasks.config import TRAINING_DAG_ID
        from tasks.datagen import DriftKnob

        day = (dt.date.fromisoformat(self.args.ds) + dt.timedelta(days=2)).isoformat()
        champion = served_version(self.url, self.api_key)
        _say(f"[6/7] A deliberately bad release ({day}): its candidate answers 5xx (release_fault error_rate 0.5)")
        self.publish(day, DriftKnob(feature_drift=1.0))
        conf = {
            "force_gate": "promote",
            "force_reason": "make run: a deliberately bad release, to show the automatic rollback",
            "release_fault": {"error_rate": 0.5},
        }
        report = self.run(TRAINING_DAG_ID, day, conf=conf, note="bad release on purpose (fault injection)")
        self.rows[-1]["expected_failure"] = True
        after = served_version(self.url, self.api_key)
        print(f"  champion v{champion} served before, v{after} serves after the abort")
        return report.state == "failed" and after == champion

    def print_table(self) -> None:
        from tasks.drift import load_drift_config

        _say("The closed loop")
        print(f"  {'dag run':78s} {'state':8s} {'PSI':24s} decision")
        for row in self.rows:
            print(
                f"  {row['dag'] + ' ' + row['run']:78.78s} {row['state']:8s} {row.get('psi', ''):24s} {row.get('decision', '')}"
            )
            if row.get("ran_as"):
                print(f"  {'':78s} {'':8s} {'executed as':24s} {row['ran_as']} (dag.test)")
            if row.get("champion"):
                print(f"  {'':78s} {'':8s} {'champion':24s} {row['champion']}")
            if row.get("quality"):
                print(f"  {'':78s} {'':8s} {'quality':24s} {row['quality']}")
            for label, text in row.get("release") or []:
                print(f"  {'':78s} {'':8s} {label:24s} {text}")
            if row.get("report"):
                print(f"  {'':78s} {'':8s} {'Evidently report':24s} {row['report']}")
        before, after = getattr(self, "champions", (None, None))
        print(f"\n  champion       v{before} before the drift, v{after} after (served at {self.url})")
        print(f"  drift reports  s3://{self.settings.lake_bucket}/drift/{self.settings.dataset}/<run>/report.html")
        print(
            f"                 and the '{load_drift_config().monitoring_experiment}' experiment at {os.environ['MLFLOW_TRACKING_URI']}"
        )
        with _quiet(self.paths):
            checks = self.records.latest("latest_drift_checks")
        if checks:
            print("  drift checks   (monitoring store, include/sql/latest_drift_checks.sql)")
            for row in checks[:4]:
                psi = (
                    f"max {row['max_psi']:.3f} pred {row['prediction_psi']:.3f}" if row["max_psi"] is not None else "-"
                )
                print(
                    f"                 {row['window_end'][:19]}  v{row['champion_version']}  rows {row['current_rows']}  "
                    f"{psi:24s} {row['decision']}"
                )


# --- the concept-drift stage: live quality from delayed labels ---------------------------------


def record_quality(records: Records, dag_id: str, run_id: str, dataset: str, row: dict[str, Any]) -> bool:
    """The quality column of a quality DAG run's row for ``dataset`` (metric before -> after, labelled rows);
    False for other DAGs."""
    from tasks import monitoring_store
    from tasks.config import QUALITY_DAG_ID

    if dag_id != QUALITY_DAG_ID:
        return False
    checks = [
        check
        for check in monitoring_store.rows_of_run(records.store, "quality_check_of_run", run_id)
        if check["dataset"] == dataset
    ]
    if not checks:
        return True
    check = checks[0]
    row["check"] = check
    if check["live_metric"] is not None:
        row["quality"] = (
            f"{check['primary_metric']} {check['holdout_metric']:.3f} -> {check['live_metric']:.3f} "
            f"on {check['labelled_rows']} labelled rows (v{check['champion_version']})"
        )
    row["report"] = check["report_uri"]
    triggered = f" -> {check['triggered_run_id']}" if check["triggered_run_id"] else ""
    row["decision"] = check["decision"] + triggered
    return True


class ConceptLoop:
    """After the PSI stages: concept drift that PSI cannot see, caught by the quality check from delayed labels.

    The traffic keeps the features of the champion's training day (so every PSI stays low) and
    reverses what the strong indicators mean; every prediction is labelled (the labelling delay
    is the generator's, shortened to minutes so the day's drop holds it), published as the
    day's feedback drop, and ``network_security_quality`` joins it with the prediction log.
    """

    LABELS = {"labelled_share": 1.0, "delay_hours": 0.05, "delay_spread": 0.5}

    def __init__(self, loop: Loop) -> None:
        from tasks.datagen import DriftKnob

        self.loop = loop
        # The champion was trained on the feature-drifted day: same features, other concept.
        self.knob = DriftKnob(feature_drift=1.0, concept_drift=0.7)
        self.today = _now().date().isoformat()

    def traffic_with_feedback(self, seed: int) -> None:
        from tasks.datagen import FeedbackKnob, label_feedback
        from tasks.feedback import publish_feedback
        from tasks.traffic import send_traffic, wait_until_logged

        loop = self.loop
        version = served_version(loop.url, loop.api_key)
        served = send_traffic(loop.url, loop.api_key, loop.spec, loop.args.traffic, seed=seed, knob=self.knob)
        wait_until_logged(loop.url)
        feedback = label_feedback(served.predictions, loop.spec, FeedbackKnob(**self.LABELS), seed=seed)
        uris = publish_feedback(
            services.s3_client(os.environ), loop.settings.raw_bucket, loop.spec, feedback, f"make-run-{seed}"
        )
        print(
            f"  {served.rows} concept-drifted records scored by v{version}; {len(feedback)} labels in {', '.join(uris)}"
        )

    def check_quality(self, note: str) -> Any:
        from tasks.config import QUALITY_DAG_ID

        # Two feedback days, so a run around midnight still finds the labels it just published; the
        # drift retrain of the previous stage started the one cooldown minutes ago: lifted here.
        conf = {"feedback_window_days": 2, "cooldown_minutes": 0}
        return self.loop.run(QUALITY_DAG_ID, _now(), conf=conf, note=note)

    def run(self) -> bool:
        from tasks.config import DRIFT_DAG_ID, QUALITY_DAG_ID, TRAINING_DAG_ID

        loop = self.loop
        before = served_version(loop.url, loop.api_key)
        _say(f"[7/7] Concept drift: publishing the labelled day {self.today} and sending its traffic to v{before}")
        loop.publish(self.today, self.knob)
        self.traffic_with_feedback(seed=104)
        _say(f"[7/7] Running {DRIFT_DAG_ID}: PSI stays below the threshold (same features)")
        loop.run(DRIFT_DAG_ID, _now(), conf={"cooldown_minutes": 0}, note="concept-drifted traffic")
        _say(f"[7/7] Running {QUALITY_DAG_ID}: the delayed labels show what PSI cannot")
        check = self.check_quality("concept-drifted traffic, labelled")
        if check.task_states.get("trigger_retraining") != "success":
            print("  the quality check did not trigger a training run; see the table below")
            return False
        _say(f"[7/7] Executing the quality-triggered {TRAINING_DAG_ID} run (trains on the drop plus the feedback)")
        loop.run_queued_retrains(self.today)
        after = served_version(loop.url, loop.api_key)
        _say(f"[7/7] Concept-drifted traffic to the new champion v{after}, labelled; a last quality check")
        self.traffic_with_feedback(seed=105)
        self.check_quality("concept-drifted traffic, new champion")
        loop.champions = (loop.champions[0], after)
        recovered = (loop.rows[-1].get("check") or {}).get("decision") == "no_quality"
        return after is not None and after != before and recovered


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _quiet(paths: Paths) -> Any:
    from scripts.dag_runner import output_to

    return output_to(paths.logs / "make_run.log")


def print_training_summary(loop: Loop, report: Any, ds: str) -> None:
    """What the first training run did: snapshot, validation, features, model, gate, deploy."""
    from mlflow import MlflowClient

    from tasks import storage
    from tasks.layout import MANIFEST, DayLayout

    _say("What the training run did")
    print(f"  run            {report.run_id}: {report.state}")
    s3 = services.s3_client(os.environ)
    layout = DayLayout(loop.settings, loop.spec, ds)
    history_file = loop.paths.state_dir / "snapshot_hashes.json"
    history = json.loads(history_file.read_text()) if history_file.exists() else {}
    if storage.exists(s3, layout.snapshot_manifest):
        snapshot = storage.get_json(s3, layout.snapshot_manifest)
        previous = history.get(f"{loop.settings.dataset}/{ds}")
        same = ""
        if previous is not None:
            same = " (same as the previous run of this ds)" if previous == snapshot["content_sha256"] else " (DIFFERS)"
        print(f"  snapshot       {snapshot['snapshot_uri']}")
        print(f"  snapshot hash  sha256:{snapshot['content_sha256']}{same}")
        kept = "dropped" if snapshot["dropped_duplicates"] else "kept"
        print(f"  rows           {snapshot['rows']} ({snapshot['duplicate_rows']} exact duplicates, {kept})")
        history[f"{loop.settings.dataset}/{ds}"] = snapshot["content_sha256"]
        history_file.write_text(json.dumps(history, indent=2))
    if storage.exists(s3, layout.validation_dir.child("result.json")):
        print(f"  validation     {layout.validation_dir.child('result.json').uri}")
    features = layout.features_dir.child(MANIFEST)
    if storage.exists(s3, features):
        manifest = storage.get_json(s3, features)
        rows = f"{manifest['train_rows']} train / {manifest['test_rows']} test rows"
        print(f"  features       {layout.features_dir.uri}/ ({rows})")
    promotion = loop.records.promotion(report.run_id)
    if promotion:
        tracking = os.environ["MLFLOW_TRACKING_URI"]
        run = MlflowClient(tracking).get_run(promotion["mlflow_run_id"])
        print(f"  MLflow run     {tracking}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}")
        estimator = run.data.params.get("best_estimator", "?")
        print(f"  model          {promotion['model_name']} v{promotion['model_version']} ({estimator})")
        metrics = json.loads(promotion["metrics_json"])["challenger"]
        print("  test metrics   " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        against = f"champion v{promotion['champion_version']}" if promotion["champion_version"] else "no champion yet"
        print(f"  gate           {promotion['decision'].upper()} against {against}")
        for reason in promotion["reason"].split("; "):
            print(f"                 - {reason}")
        print(f"  champion       v{champion_after(promotion)}")
    deployed = loop.records.of_run("deployments_of_run", report.run_id)
    for row in deployed:
        status = f"{row['action']} {row['status']} v{row['model_version']}"
        if row["target"] == "ec2":
            print(f"  EC2 fleet      {', '.join(json.loads(row['instance_ids'] or '[]'))}: {status}")
        else:
            print(f"  local server   {row['endpoint']}: {status}")
    for label, text in release_lines(deployed):
        print(f"  {label:14s} {text}")
    with _quiet(loop.paths):
        promotions = loop.records.latest("latest_promotions")
        deployments = loop.records.latest("latest_deployments")
    if promotions:
        print("  promotion log  (monitoring store, include/sql/latest_promotions.sql)")
        for row in promotions[:3]:
            print(
                f"                 {row['decided_at'][:19]}  {row['model_name']} v{row['model_version']}  "
                f"{row['decision']:15s} {row['primary_metric']} {row['challenger_metric']:.4f}"
            )
    if deployments:
        print("  deployment log (monitoring store, include/sql/latest_deployments.sql)")
        for row in deployments[:4]:
            print(
                f"                 {row['recorded_at'][:19]}  {row['action']:8s} {row['target']:5s} "
                f"{row['model_name']} v{row['model_version']}  {row['status']}"
            )


def main(argv: list[str] | None = None) -> int:
    yesterday = (dt.datetime.now(dt.UTC).date() - dt.timedelta(days=2)).isoformat()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--ds", default=yesterday, help="first day to publish and train on (default: two days ago, UTC)"
    )
    parser.add_argument("--rows", type=int, default=5000, help="rows per published day")
    parser.add_argument("--parts", type=int, default=2, help="CSV files per published day")
    parser.add_argument("--traffic", type=int, default=3000, help="records sent to the model server per traffic stage")
    parser.add_argument("--no-loop", action="store_true", help="stop after the first training run (no drift loop)")
    parser.add_argument("--no-concept", action="store_true", help="skip the concept-drift (live quality) stage")
    args = parser.parse_args(argv)

    _say("Starting the embedded stack (moto S3/ECR/EC2/SSM emulator, MLflow, Airflow metadata)")
    paths = Paths.from_env()
    try:
        env = bootstrap.up(paths)
    except (SupervisorError, RuntimeError) as err:
        print(f"stack: {err}", file=sys.stderr)
        return 2
    os.environ.update(env)
    # Off by default everywhere else: lets step 5's release ask for a faulty candidate.
    os.environ.setdefault("NS_SERVING_FAULT_INJECTION", "true")

    loop = Loop(paths, args)
    first = loop.train_first()
    closed = None
    if first.succeeded and not args.no_loop:
        closed = loop.loop() and loop.bad_release()
        if closed and not args.no_concept:
            closed = ConceptLoop(loop).run()
        loop.print_table()
    version = served_version(loop.url, loop.api_key)
    if version:
        print(f"\n  serving        {loop.url} serves v{version}; try:")
        print(f"                 source {paths.env_file}")
        print(
            f'                 curl -s -H "X-API-Key: $NS_SERVING_API_KEY" -H "Content-Type: application/json" '
            f"-d @{SAMPLE.relative_to(PROJECT_ROOT)} {loop.url}/predict"
        )
    print(f"  MLflow UI      {os.environ['MLFLOW_TRACKING_URI']}")
    print(f"  use the stack  source {paths.env_file}  (then `airflow ...`, `aws s3 ls` style tools)")
    print(f"  wall time      {time.monotonic() - loop.started:.0f}s")
    failed = [row for row in loop.rows if row["state"] != "success" and not row.get("expected_failure")]
    if failed or not first.succeeded or closed is False:
        print(f"\nSomething did not go as planned (see the table and {paths.logs})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
