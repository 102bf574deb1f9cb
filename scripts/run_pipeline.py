"""``make run``: the whole closed loop on the embedded stack, stage by stage.

1. start the stack; publish day D's drop; run ``network_security_training`` (ingest →
   validate → transform → train → gate → deploy): the champion serves on 127.0.0.1:8000;
2. send normal traffic to the served model; run ``network_security_drift``: no drift;
3. publish a drifted day D+1 and send drifted traffic; run the drift DAG again: it
   triggers a training run, which is then executed (``dag.test()`` of the queued run with
   its conf), promotes and deploys a new champion;
4. send drifted traffic to the new champion; a last drift check finds no drift against
   its reference (the drifted snapshot it was trained on);
5. print a table of every DAG run, PSI, decisions, champion versions and report locations.

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

from scripts import stack
from scripts.airflow_settings import PROJECT_ROOT

SAMPLE = PROJECT_ROOT / "include" / "samples" / "network_security_record.json"


def _say(step: str) -> None:
    print(f"\n==> {step}", flush=True)


def monitoring_records(sql_file: str) -> list[tuple]:
    """Rows of a query in ``include/sql/``, read through the monitoring store's Airflow connection."""
    # Outside a task, connections come from the metadata DB (or secrets backend) directly.
    from airflow.models.connection import Connection  # noqa: AIR311

    from tasks.config import Settings

    conn_id = Settings().monitoring_conn_id
    connection = Connection.get_connection_from_secrets(conn_id)
    # Hooks resolve their connection through the Task SDK, which outside a task only sees
    # environment connections: hand it this one that way.
    os.environ[f"AIRFLOW_CONN_{conn_id.upper()}"] = connection.get_uri()
    hook = connection.get_hook()
    return hook.get_records((PROJECT_ROOT / "include" / "sql" / sql_file).read_text())


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

    def __init__(self, paths: stack.Paths, args: argparse.Namespace) -> None:
        from scripts.bootstrap import configured_settings
        from tasks.dataset_spec import load_spec

        self.paths = paths
        self.args = args
        self.settings = configured_settings(dict(os.environ))
        self.spec = load_spec(self.settings.dataset)
        self.url = f"http://127.0.0.1:{os.environ['SERVING_PORT']}"
        self.api_key = os.environ["NS_SERVING_API_KEY"]
        self.rows: list[dict[str, Any]] = []  # the final table
        self.started = time.monotonic()

    # --- helpers -------------------------------------------------------------------------

    def log_path(self, name: str) -> Any:
        return self.paths.logs / f"{name}.log"

    def run(self, dag_id: str, when: Any, conf: dict | None = None, note: str = "") -> Any:
        from scripts.dag_runner import run_dag

        began = time.monotonic()
        report = run_dag(dag_id, when, conf=conf, log_path=self.log_path(dag_id))
        self.record(dag_id, report, note, time.monotonic() - began)
        return report

    def record(self, dag_id: str, report: Any, note: str, seconds: float) -> None:
        outputs = report.outputs
        row = {"dag": dag_id, "run": report.run_id, "state": report.state, "seconds": seconds, "note": note}
        check = outputs.get("check_drift")
        if check:
            row["psi"] = f"max {check['max_psi']:.3f} / pred {check['prediction_psi']:.3f}"
            row["report"] = check.get("report_url") or check["report_uri"]
        decision = outputs.get("decide_retraining:decision")
        if decision:
            row["decision"] = decision["outcome"] + (
                f" -> {decision['retrain']['run_id']}" if decision["retrain"] else ""
            )
        elif report.task_states.get("check_drift") == "skipped":
            row["decision"] = "skipped (too few rows)"
        evaluation = outputs.get("evaluate")
        if evaluation:
            row["decision"] = f"gate {evaluation['decision']}"
            row["champion"] = f"v{evaluation['champion_version'] or '-'} -> v" + str(
                (outputs.get("promote_champion") or outputs.get("keep_champion") or {}).get("champion_version")
            )
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

        outcome = report.outputs.get("promote_champion") or report.outputs.get("keep_champion") or {}
        champion = outcome.get("champion_version")
        if report.succeeded and champion and served_version(self.url, self.api_key) != champion:
            _say(f"The champion v{champion} is not being served: running {DEPLOY_DAG_ID} (redeploy)")
            self.run(DEPLOY_DAG_ID, ds, conf={"action": "redeploy"}, note="redeploy the kept champion")

    # --- stages --------------------------------------------------------------------------

    def train_first(self) -> Any:
        from tasks.config import TRAINING_DAG_ID

        _say(f"[1/5] Publishing the {self.args.ds} drop of {self.settings.dataset}: {self.args.rows} rows")
        self.publish(self.args.ds)
        _say(f"[1/5] Running {TRAINING_DAG_ID} for ds={self.args.ds} (logs: {self.log_path(TRAINING_DAG_ID)})")
        report = self.run(TRAINING_DAG_ID, self.args.ds, note="daily run")
        print_training_summary(report, self.paths, self.settings, self.args.ds)
        self.ensure_served(report, self.args.ds)
        return report

    def loop(self) -> bool:
        from scripts.dag_runner import run_queued
        from tasks.config import DRIFT_DAG_ID, TRAINING_DAG_ID
        from tasks.datagen import DriftKnob

        drifted_day = (dt.date.fromisoformat(self.args.ds) + dt.timedelta(days=1)).isoformat()
        knob = DriftKnob(feature_drift=1.0)
        before = served_version(self.url, self.api_key)
        self.champions = (before, None)

        _say(f"[2/5] Normal traffic to the champion v{before} at {self.url}")
        self.traffic(self.args.traffic, seed=101)
        _say(f"[2/5] Running {DRIFT_DAG_ID}: the window holds normal traffic")
        self.run(DRIFT_DAG_ID, _now(), note="normal traffic")

        _say(f"[3/5] Publishing a drifted day ({drifted_day}) and sending drifted traffic")
        self.publish(drifted_day, knob)
        self.traffic(self.args.traffic, seed=102, knob=knob, label="drifted")
        _say(f"[3/5] Running {DRIFT_DAG_ID}: the window now holds drifted traffic")
        check = self.run(DRIFT_DAG_ID, _now(), note="drifted traffic")
        decision = check.outputs.get("decide_retraining:decision") or {}
        if decision.get("outcome") == "cooldown":
            # An earlier make run retrained minutes ago: storm protection holds this drift back.
            print(f"  {decision['reason']}: the storm protection of an earlier run.")
            _say(f"[3/5] Running {DRIFT_DAG_ID} again with the run param cooldown_minutes=0, to show the loop")
            check = self.run(DRIFT_DAG_ID, _now(), conf={"cooldown_minutes": 0}, note="drifted traffic, no cooldown")
        if check.task_states.get("trigger_retraining") != "success":
            print("  the drift check did not trigger a training run; see the table below")
            return False

        _say(f"[4/5] Executing the triggered {TRAINING_DAG_ID} run (logs: {self.log_path(TRAINING_DAG_ID)})")
        began = time.monotonic()
        for triggered_id, report in run_queued(TRAINING_DAG_ID, self.log_path(TRAINING_DAG_ID)):
            self.record(
                TRAINING_DAG_ID, report, f"queued by the drift check as {triggered_id}", time.monotonic() - began
            )
            evaluation = report.outputs.get("evaluate") or {}
            for reason in evaluation.get("reasons", []):
                print(f"  gate: {reason}")
            self.ensure_served(report, drifted_day)
        after = served_version(self.url, self.api_key)

        _say(f"[5/5] Drifted traffic to the new champion v{after}; a last drift check")
        self.traffic(self.args.traffic, seed=103, knob=knob, label="drifted")
        self.run(DRIFT_DAG_ID, _now(), note="drifted traffic, new champion")
        self.champions = (before, after)
        return after is not None and after != before

    def print_table(self) -> None:
        _say("The closed loop")
        print(f"  {'dag run':78s} {'state':8s} {'PSI':24s} decision")
        for row in self.rows:
            print(
                f"  {row['dag'] + ' ' + row['run']:78.78s} {row['state']:8s} {row.get('psi', ''):24s} {row.get('decision', '')}"
            )
            if row.get("champion"):
                print(f"  {'':78s} {'':8s} {'champion':24s} {row['champion']}")
            if row.get("report"):
                print(f"  {'':78s} {'':8s} {'Evidently report':24s} {row['report']}")
        before, after = getattr(self, "champions", (None, None))
        print(f"\n  champion       v{before} before the drift, v{after} after (served at {self.url})")
        print(f"  drift reports  s3://{self.settings.lake_bucket}/drift/{self.settings.dataset}/<run>/report.html")
        print(
            f"                 and the '{self.settings.mlflow_experiment.replace('training', 'monitoring')}' experiment at {os.environ['MLFLOW_TRACKING_URI']}"
        )
        with _quiet(self.paths):
            checks = monitoring_records("latest_drift_checks.sql")
        if checks:
            print("  drift checks   (monitoring store, include/sql/latest_drift_checks.sql)")
            for row in checks[:4]:
                psi = f"max {row[4]:.3f} pred {row[5]:.3f}" if row[4] is not None else "-"
                print(f"                 {row[0][:19]}  v{row[1]}  rows {row[2]}  {psi:24s} {row[6]}")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _quiet(paths: stack.Paths) -> Any:
    from scripts.dag_runner import output_to

    return output_to(paths.logs / "make_run.log")


def print_training_summary(report: Any, paths: stack.Paths, settings: Any, ds: str) -> None:
    """What the first training run did: snapshot, validation, features, model, gate, deploy."""
    _say("What the training run did")
    print(f"  run            {report.run_id}: {report.state}")
    ingest = report.outputs.get("ingest") or {}
    history_file = paths.state_dir / "snapshot_hashes.json"
    history = json.loads(history_file.read_text()) if history_file.exists() else {}
    if ingest:
        previous = history.get(f"{settings.dataset}/{ds}")
        same = ""
        if previous is not None:
            same = " (same as the previous run of this ds)" if previous == ingest["content_hash"] else " (DIFFERS)"
        print(f"  snapshot       {ingest['snapshot_uri']}")
        print(f"  snapshot hash  sha256:{ingest['content_hash']}{same}")
        kept = "dropped" if ingest["dropped_duplicates"] else "kept"
        print(f"  rows           {ingest['rows']} ({ingest['duplicate_rows']} exact duplicates, {kept})")
        history[f"{settings.dataset}/{ds}"] = ingest["content_hash"]
        history_file.write_text(json.dumps(history, indent=2))
    if report.outputs.get("validate"):
        print(f"  validation     {report.outputs['validate']}")
    transform = report.outputs.get("transform") or {}
    if transform:
        print(
            f"  features       {transform['features_uri']} "
            f"({transform['train_rows']} train / {transform['test_rows']} test rows)"
        )
    training = report.outputs.get("train") or {}
    if training:
        tracking = os.environ["MLFLOW_TRACKING_URI"]
        print(f"  MLflow run     {tracking}/#/experiments/{training['experiment_id']}/runs/{training['run_id']}")
        print(f"  model          {training['model_name']} v{training['model_version']} ({training['best_estimator']})")
    evaluation = report.outputs.get("evaluate") or {}
    if evaluation:
        metrics = evaluation["challenger_metrics"]
        print("  test metrics   " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        champion = evaluation["champion_version"]
        against = f"champion v{champion}" if champion else "no champion yet"
        print(f"  gate           {evaluation['decision'].upper()} against {against}")
        for reason in evaluation["reasons"]:
            print(f"                 - {reason}")
    outcome = report.outputs.get("promote_champion") or report.outputs.get("keep_champion")
    if outcome:
        print(f"  champion       v{outcome['champion_version']}")
    outputs = report.outputs
    if outputs.get("deploy.publish_image"):
        image = outputs["deploy.publish_image"]
        how = {"manifest": "manifest recorded, no Docker engine", "existing": "already there"}.get(
            image["how"], "pushed"
        )
        print(f"  image          {image['image_uri']} ({how})")
    if outputs.get("deploy.ec2_fleet"):
        fleet = outputs["deploy.ec2_fleet"]
        print(f"  EC2 fleet      {', '.join(fleet['instance_ids'])} (SSM command {outputs.get('deploy.rollout_ec2')})")
    if outputs.get("deploy.smoke_test"):
        smoke = outputs["deploy.smoke_test"]
        print(
            f"  smoke test     {smoke['records']} records, accuracy {smoke['accuracy']:.3f}, v{smoke['model_version']}"
        )
    with _quiet(paths):
        promotions = monitoring_records("latest_promotions.sql")
        deployments = monitoring_records("latest_deployments.sql")
    if promotions:
        print("  promotion log  (monitoring store, include/sql/latest_promotions.sql)")
        for row in promotions[:3]:
            print(f"                 {row[0][:19]}  {row[1]} v{row[2]}  {row[3]:15s} {row[4]} {row[5]:.4f}")
    if deployments:
        print("  deployment log (monitoring store, include/sql/latest_deployments.sql)")
        for row in deployments[:4]:
            print(f"                 {row[0][:19]}  {row[1]:8s} {row[2]:5s} {row[3]} v{row[4]}  {row[5]}")


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
    args = parser.parse_args(argv)

    _say("Starting the embedded stack (moto S3/ECR/EC2/SSM emulator, MLflow, Airflow metadata)")
    paths = stack.Paths.from_env()
    try:
        env = stack.up(paths)
    except stack.StackError as err:
        print(f"stack: {err}", file=sys.stderr)
        return 2
    os.environ.update(env)

    loop = Loop(paths, args)
    first = loop.train_first()
    closed = None
    if first.succeeded and not args.no_loop:
        closed = loop.loop()
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
    failed = [row for row in loop.rows if row["state"] != "success"]
    if failed or not first.succeeded or closed is False:
        print(f"\nSomething did not go as planned (see the table and {paths.logs})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
