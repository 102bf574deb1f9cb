"""Drift: what the served champion sees against what it was trained on, with Evidently PSI.

* **Current**: the prediction log's last ``window_hours`` hour partitions, only the rows
  the champion served, read column-projected (features + probability) with compact dtypes
  straight into Arrow; above ``sample_cap`` rows a uniform random sample with a fixed seed.
  The log is ``predictions/<model_name>/dt=YYYY-MM-DD/HH/`` (one folder per served model),
  and the legacy ``predictions/dt=YYYY-MM-DD/HH/`` of a shared log is read too; an object
  that cannot be read is skipped and counted in the summary, never a failed check.
* **Reference**: the champion's training snapshot(s) (found through its MLflow run's
  ``lineage.json``), scored by the champion so the prediction distributions compare.
* **Drift**: Evidently's ``DataDriftPreset(method="psi", threshold=psi_threshold)`` over the
  features and the probability; one PSI per column, read back from the report.
* **Decision**: drift is one signal of the retrain rule (``tasks.retrain``): it fires when any
  feature's PSI or the prediction PSI is >= the threshold, and the rule adds the consecutive
  checks, active runs and the cooldown (storm protection).

:func:`run_check` and :func:`decide_retraining` are the drift DAG's two steps; the DAG binds
them to the S3 connection, MLflow and the monitoring store.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import yaml

from tasks import monitoring_store, retrain, storage
from tasks.config import training_dag_id
from tasks.dataset_spec import PROJECT_ROOT, DatasetSpec

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

    from tasks.monitoring_store import Store
    from tasks.plan import CheckPlan

log = logging.getLogger(__name__)

DRIFT_CONFIG = PROJECT_ROOT / "include" / "drift.yaml"
PREDICTION_COLUMN = "probability"
VERSION_COLUMN = "model_version"
MODEL_COLUMN = "model_name"


class DriftError(RuntimeError):
    """The check cannot be made (no champion, no reference); the message says what to do."""


class NotEnoughData(RuntimeError):
    """The current window holds fewer rows than ``min_rows``: no decision on too little data.

    Attributes:
        summary: What was found (champion, rows), recorded with the skipped check.
    """

    def __init__(self, reason: str, summary: dict[str, Any]) -> None:
        super().__init__(reason)
        self.summary = summary


@dataclass(frozen=True)
class DriftConfig:
    psi_threshold: float = 0.25
    window_hours: int = 24
    min_rows: int = 500
    consecutive_checks: int = 1
    cooldown_minutes: int = 360
    sample_cap: int = 1_000_000
    sample_seed: int = 0
    retrain_window_days: int = 1
    monitoring_experiment: str = "network_security_monitoring"

    def __post_init__(self) -> None:
        if not 0 < self.psi_threshold < math.inf:
            raise ValueError(f"psi_threshold must be positive, got {self.psi_threshold}")
        for name in ("window_hours", "min_rows", "consecutive_checks", "sample_cap", "retrain_window_days"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.cooldown_minutes < 0:
            raise ValueError(f"cooldown_minutes must be 0 or more, got {self.cooldown_minutes}")

    def replace(self, **changes: Any) -> DriftConfig:
        """A copy with the non-None ``changes`` applied (run params override the file)."""
        values = {**asdict(self), **{k: v for k, v in changes.items() if v is not None}}
        return DriftConfig(**values)


def load_drift_config(path: Path = DRIFT_CONFIG, dataset: str | None = None) -> DriftConfig:
    """Read ``include/drift.yaml``; unknown keys or bad values fail naming the file.

    The file's top-level keys hold for every dataset; its ``datasets:`` section overrides them
    per dataset (``datasets: {intrusion_flows: {psi_threshold: 0.2}}``), so each monitored
    dataset has its own thresholds and cooldown.

    Args:
        path: The configuration file.
        dataset: The dataset whose overrides apply (None: the common values only).
    """
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping, got {type(raw).__name__}")
    per_dataset = raw.pop("datasets", None) or {}
    if not isinstance(per_dataset, dict) or not all(isinstance(v, dict) for v in per_dataset.values()):
        raise ValueError(
            f"{path}: 'datasets' maps dataset names to overrides, e.g. {{intrusion_flows: {{min_rows: 200}}}}"
        )
    known = set(DriftConfig.__dataclass_fields__)
    for where, values in [("", raw), *((f"datasets.{name}: ", v) for name, v in per_dataset.items())]:
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{path}: {where}unknown key(s) {unknown}; known: {sorted(known)}")
    try:
        config = DriftConfig(**raw)
        # Every dataset's overrides are checked, not only the one asked for: a typo fails every check.
        overridden = {name: config.replace(**values) for name, values in per_dataset.items()}
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from err
    return overridden.get(dataset, config) if dataset is not None else config


# --- the current window ------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """The hours a check reads: ``partitions`` (``dt=YYYY-MM-DD/HH``, oldest first) from ``start`` up to ``end``."""

    start: dt.datetime
    end: dt.datetime
    partitions: tuple[str, ...] = field(default_factory=tuple)


def _partition(hour: dt.datetime) -> str:
    return f"dt={hour:%Y-%m-%d}/{hour:%H}"


def window(window_end: dt.datetime, hours: int) -> Window:
    """The ``hours`` hour partitions before ``window_end`` (exclusive), and the window's bounds in UTC.

    An hourly run at 13:00 reads hours 12, 11, ...; a manual run at 13:20 reads hour 13 too.
    """
    end = window_end.astimezone(dt.UTC)
    last = (end - dt.timedelta(microseconds=1)).replace(minute=0, second=0, microsecond=0)
    first = last - dt.timedelta(hours=hours - 1)
    partitions = tuple(_partition(first + dt.timedelta(hours=h)) for h in range(hours))
    return Window(start=first, end=end, partitions=partitions)


def current_schema(spec: DatasetSpec) -> pa.Schema:
    """The columns the check reads from the prediction log, with compact types.

    Features in the spec's (small) integer types, the probability as float32, and the model
    name and version dictionary-encoded: 10M rows of them cost 80 MB, not 400 MB.
    """
    import pyarrow as pa

    label = pa.dictionary(pa.int32(), pa.string())
    fields = [pa.field(c.name, pa.from_numpy_dtype(_numpy_dtype(c.dtype))) for c in spec.features]
    return pa.schema(
        [
            *fields,
            pa.field(PREDICTION_COLUMN, pa.float32()),
            pa.field(MODEL_COLUMN, label),
            pa.field(VERSION_COLUMN, label),
        ]
    )


def _numpy_dtype(name: str) -> Any:
    import numpy as np

    return np.dtype(name)


def read_object(body: bytes, key: str, schema: pa.Schema) -> pa.Table:
    """One prediction-log object (``.parquet`` or ``.jsonl``), projected and cast to ``schema``."""
    import pyarrow as pa
    import pyarrow.json as pa_json
    import pyarrow.parquet as pq

    if key.endswith(".parquet"):
        table = pq.read_table(io.BytesIO(body), columns=schema.names, read_dictionary=[MODEL_COLUMN, VERSION_COLUMN])
    elif key.endswith((".jsonl", ".json")):
        # Arrow's JSON reader parses in C++ and drops the fields outside the schema; it
        # cannot produce dictionaries, so those two columns are read as strings and cast.
        plain = pa.schema([f.with_type(pa.string()) if pa.types.is_dictionary(f.type) else f for f in schema])
        options = pa_json.ParseOptions(explicit_schema=plain, unexpected_field_behavior="ignore")
        table = pa_json.read_json(io.BytesIO(body), parse_options=options)
    else:
        raise ValueError(f"{key}: not a prediction-log object (expected .parquet or .jsonl)")
    # The server writes these on every record: an object without them is not its log.
    for name in (PREDICTION_COLUMN, MODEL_COLUMN, VERSION_COLUMN):
        if table[name].null_count:
            raise ValueError(f"{key}: {table[name].null_count} of {table.num_rows} record(s) have no {name!r}")
    return table.select(schema.names).cast(schema)


class WindowRead(NamedTuple):
    """What :func:`read_window` found."""

    table: pa.Table  # the kept rows: features, probability, model name and version
    read_rows: int  # rows read before the model filter (other models and versions share a log)
    skipped: tuple[str, ...]  # objects that could not be read, as "<key>: <error>"


def window_prefixes(prefix: str, model_name: str | None, partition: str) -> list[str]:
    """Where one hour of the log lives: the model's own folder, then the legacy shared one."""
    base = prefix.strip("/")
    legacy = f"{base}/{partition}/" if base else f"{partition}/"
    return ([f"{base}/{model_name}/{partition}/"] if model_name else []) + [legacy]


def read_window(
    client: Any,
    bucket: str,
    prefix: str,
    partitions: list[str] | tuple[str, ...],
    spec: DatasetSpec,
    model: tuple[str, str] | None,
) -> WindowRead:
    """The window's rows served by ``model`` = (registered name, version); every legacy row when None.

    Reads ``<prefix>/<model name>/<partition>/`` and the legacy ``<prefix>/<partition>/`` (records
    there carry ``model_name``: only the model's are kept). An object that cannot be parsed is
    skipped and reported (one bad object must not hide a day of predictions); S3 errors raise.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    schema = current_schema(spec)
    tables, read_rows, skipped = [], 0, []
    for partition in partitions:
        for base in window_prefixes(prefix, model[0] if model else None, partition):
            for key in storage.list_keys(client, bucket, base):
                body = storage.get_bytes(client, storage.S3Location(bucket, key))
                try:
                    # Object by object, so only the kept rows of one object are ever held twice.
                    table = read_object(body, key, schema)
                except (pa.ArrowException, ValueError, KeyError) as err:
                    log.warning("skipping unreadable prediction-log object s3://%s/%s: %s", bucket, key, err)
                    skipped.append(f"{key}: {str(err).splitlines()[0][:200]}")
                    continue
                read_rows += table.num_rows
                if model is not None:
                    name, version = model
                    table = table.filter(
                        pc.and_(pc.equal(table[MODEL_COLUMN], name), pc.equal(table[VERSION_COLUMN], str(version)))
                    )
                tables.append(table)
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    return WindowRead(table, read_rows, tuple(skipped))


def sample(table: pa.Table, cap: int, seed: int) -> pa.Table:
    """A uniform random sample of ``cap`` rows (fixed seed, original order), or the table if smaller."""
    import numpy as np

    if table.num_rows <= cap:
        return table
    indices = np.sort(np.random.default_rng(seed).choice(table.num_rows, size=cap, replace=False))
    return table.take(indices)


def to_frame(table: pa.Table, spec: DatasetSpec) -> pd.DataFrame:
    """Features (the spec's dtypes) and the probability (float32), nothing else."""
    columns = [*spec.feature_names, PREDICTION_COLUMN]
    return table.select(columns).to_pandas()


# --- the reference ------------------------------------------------------------------------


def champion_reference(tracking_uri: str, model_name: str) -> dict[str, Any]:
    """The champion's version, run and training snapshots (from its MLflow run's ``lineage.json``).

    Raises:
        DriftError: No champion: there is nothing to compare against yet.
    """
    from tasks.registry import alias_lineage
    from tasks.tracking import CHAMPION, check_tracking_server

    check_tracking_server(tracking_uri)
    champion = alias_lineage(tracking_uri, model_name, CHAMPION)
    if champion is None:
        raise DriftError(
            f"registered model {model_name!r} has no champion: nothing is served, so there is no drift to "
            "measure. Run network_security_training first (make run)."
        )
    return {
        "model_name": model_name,
        "model_version": champion.version,
        "run_id": champion.run_id,
        "snapshot_uris": list(champion.lineage["snapshot_uris"]),
        "content_hashes": list(champion.lineage.get("content_hashes", [])),
    }


def reference_frame(client: Any, tracking_uri: str, champion: dict[str, Any], spec: DatasetSpec) -> pd.DataFrame:
    """The champion's training snapshot(s), features only, scored by the champion."""
    import pandas as pd

    from tasks.model_io import load_model

    frames = [
        storage.read_parquet(client, storage.parse_s3_uri(uri), columns=spec.feature_names)
        for uri in champion["snapshot_uris"]
    ]
    reference = pd.concat(frames, ignore_index=True).astype({c.name: c.dtype for c in spec.features})
    model = load_model(tracking_uri, champion["model_name"], champion["model_version"])
    classes = list(model.classes_)
    positive = classes.index(spec.positive_class)
    reference[PREDICTION_COLUMN] = model.predict_proba(reference[spec.feature_names])[:, positive].astype("float32")
    return reference


# --- PSI with Evidently -------------------------------------------------------------------


def psi_report(reference: pd.DataFrame, current: pd.DataFrame, spec: DatasetSpec, threshold: float) -> tuple[Any, dict]:
    """Evidently's data drift preset with PSI on every feature and the probability.

    Returns:
        The Evidently snapshot (for HTML) and ``{column: psi}``.
    """
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    categorical = [c.name for c in spec.features if c.kind == "categorical"]
    numerical = [c.name for c in spec.features if c.kind != "categorical"] + [PREDICTION_COLUMN]
    definition = DataDefinition(categorical_columns=categorical, numerical_columns=numerical)
    columns = [*spec.feature_names, PREDICTION_COLUMN]
    report = Report([DataDriftPreset(columns=columns, method="psi", threshold=threshold)])
    snapshot = report.run(
        current_data=Dataset.from_pandas(current[columns], data_definition=definition),
        reference_data=Dataset.from_pandas(reference[columns], data_definition=definition),
    )
    psi = {}
    for metric in snapshot.dict()["metrics"]:
        config = metric.get("config") or {}
        if config.get("type", "").endswith("ValueDrift"):
            psi[config["column"]] = float(metric["value"])
    missing = sorted(set(columns) - set(psi))
    if missing:
        raise DriftError(f"Evidently returned no PSI for {missing}")
    return snapshot, psi


def summarize(
    psi: dict[str, float],
    threshold: float,
    *,
    window: dict[str, Any],
    rows: dict[str, int],
    champion: dict[str, Any],
    skipped_objects: tuple[str, ...] | list[str] = (),
) -> dict[str, Any]:
    """The JSON summary of one check (what the drift DAG stores, logs and decides on).

    ``skipped_objects`` are the prediction-log objects that could not be read (counted, and the
    first ten named, so a broken writer shows up without failing the check).
    """
    features = {k: round(v, 6) for k, v in psi.items() if k != PREDICTION_COLUMN}
    drifted = sorted((k for k, v in features.items() if v >= threshold), key=lambda k: -features[k])
    prediction_psi = round(psi[PREDICTION_COLUMN], 6)
    return {
        "psi_threshold": threshold,
        "feature_psi": features,
        "prediction_psi": prediction_psi,
        "drifted_features": drifted,
        "drifted_share": round(len(drifted) / len(features), 4),
        "max_psi": max([*features.values(), prediction_psi]),
        "drift_detected": bool(drifted) or prediction_psi >= threshold,
        "window": window,
        "rows": rows,
        "sampled": rows["evaluated"] < rows["current"],
        "champion": {k: champion[k] for k in ("model_name", "model_version", "run_id")},
        "reference_snapshots": champion["snapshot_uris"],
        "skipped_objects": {"count": len(skipped_objects), "first": list(skipped_objects[:10])},
    }


# --- the decision ---------------------------------------------------------------------------


def drift_signal(summary: dict[str, Any], history: list[bool], consecutive: int) -> retrain.Signal:
    """This check's drift as a signal of the retrain rule (``history``: previous checks, newest first)."""
    return retrain.Signal(
        kind="drift",
        fired=bool(summary["drift_detected"]),
        history=tuple(history),
        consecutive=consecutive,
        reason=retrain_reason(summary),
        evidence={
            "drift_report_uri": summary.get("report_uri"),
            "max_psi": summary["max_psi"],
            "drifted_features": list(summary["drifted_features"]),
        },
    )


def retrain_reason(summary: dict[str, Any]) -> str:
    drifted = summary["drifted_features"]
    shown = ", ".join(drifted[:5]) + (f" and {len(drifted) - 5} more" if len(drifted) > 5 else "")
    parts = [f"max PSI {summary['max_psi']:.3f} >= {summary['psi_threshold']}"]
    if drifted:
        parts.append(f"drifted features: {shown}")
    parts.append(f"prediction PSI {summary['prediction_psi']:.3f}")
    return "drift: " + "; ".join(parts)


def newest_labelled_day(client: Any, bucket: str, raw_prefix: str, not_after: str) -> str | None:
    """The newest ``ds`` with a drop in the landing zone, on or before ``not_after``."""
    paginator = client.get_paginator("list_objects_v2")
    days = []
    for page in paginator.paginate(Bucket=bucket, Prefix=f"{raw_prefix.strip('/')}/ds=", Delimiter="/"):
        for common in page.get("CommonPrefixes", []):
            day = common["Prefix"].rstrip("/").rsplit("ds=", 1)[-1]
            if day <= not_after:
                days.append(day)
    return max(days) if days else None


def render_html(snapshot: Any) -> bytes:
    """The Evidently report as one self-contained HTML page."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "report.html"
        snapshot.save_html(str(path))
        return path.read_bytes()


def write_outputs(client: Any, bucket: str, prefix: str, html: bytes, summary: dict[str, Any]) -> dict[str, str]:
    """``report.html`` and ``metrics.json`` under ``s3://<bucket>/<prefix>/``."""
    base = storage.S3Location(bucket, prefix.strip("/"))
    return {
        "report_uri": storage.put_bytes(client, base.child("report.html"), html, content_type="text/html"),
        "summary_uri": storage.put_bytes(client, base.child("metrics.json"), json.dumps(summary, indent=2).encode()),
    }


# --- the drift DAG's steps ----------------------------------------------------------------------


def run_folder(dag_run_id: str) -> str:
    """A DAG run id as an S3 folder name (``:`` and ``+`` of manual run ids become ``_``)."""
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in dag_run_id)


def run_check(client: Any, store: Store, plan: CheckPlan, dag_run_id: str) -> dict[str, Any]:
    """The check: the window against the champion's training data; report and summary to S3 and MLflow.

    Args:
        client: boto3 S3 client (prediction log, snapshots, reports).
        store: The monitoring store (a skipped check is recorded there).
        plan: The check's plan.
        dag_run_id: The drift DAG run (names the report folder and the monitoring run).

    Returns:
        The summary (PSI per column, decision inputs, report URIs, the monitoring run's URLs).

    Raises:
        DriftError: No champion (nothing to compare against): not worth retrying.
        NotEnoughData: Fewer than ``min_rows`` current rows; the skipped check is recorded first.
    """
    config = plan.config
    spec = plan.spec
    tracking_uri = plan.settings.mlflow_tracking_uri
    champion = champion_reference(tracking_uri, plan.model_name)
    current = read_window(
        client,
        plan.settings.lake_bucket,
        "predictions",
        plan.partitions,
        spec,
        (champion["model_name"], champion["model_version"]),
    )
    rows = current.table.num_rows
    if rows < config.min_rows:
        reason = (
            f"{rows} predictions of champion v{champion['model_version']} in the window "
            f"({current.read_rows} read; minimum {config.min_rows}): no decision on too little data"
        )
        found = {"champion": champion, "rows": {"current": rows}}
        record_check(store, plan, dag_run_id, found, retrain.Decision(False, "skipped", reason))
        raise NotEnoughData(reason, found)
    evaluated = sample(current.table, config.sample_cap, config.sample_seed)
    reference = reference_frame(client, tracking_uri, champion, spec)
    snapshot, psi = psi_report(reference, to_frame(evaluated, spec), spec, config.psi_threshold)
    summary = summarize(
        psi,
        config.psi_threshold,
        window={"start": plan.window_start, "end": plan.window_end, "partitions": len(plan.partitions)},
        rows={"current": rows, "evaluated": evaluated.num_rows, "reference": len(reference)},
        champion=champion,
        skipped_objects=current.skipped,
    )
    html = render_html(snapshot)
    prefix = f"drift/{plan.dataset}/{run_folder(dag_run_id)}"
    summary.update(write_outputs(client, plan.settings.lake_bucket, prefix, html, summary))
    summary.update(log_monitoring_run(plan, summary, html, dag_run_id))
    log.info(
        "drift: max PSI %.3f, prediction PSI %.3f, drifted %s (%d of %d rows evaluated, %d object(s) skipped)",
        summary["max_psi"],
        summary["prediction_psi"],
        summary["drifted_features"],
        evaluated.num_rows,
        rows,
        len(current.skipped),
    )
    return summary


def log_monitoring_run(plan: CheckPlan, summary: dict[str, Any], html: bytes, dag_run_id: str) -> dict[str, str]:
    """A run of the monitoring experiment with the PSI metrics, the summary and the report.

    Returns:
        ``mlflow_run_id``, ``mlflow_run_url`` and ``report_url`` (the report, served by MLflow).
    """
    import mlflow

    tracking_uri = plan.settings.mlflow_tracking_uri
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(plan.config.monitoring_experiment)
    champion = summary["champion"]
    with mlflow.start_run(run_name=f"drift {plan.window_end[:16]}") as run:
        mlflow.set_tags(
            {
                "airflow_dag_run_id": dag_run_id,
                "dataset": plan.dataset,
                "model_name": champion["model_name"],
                "champion_version": champion["model_version"],
                "champion_run_id": champion["run_id"],
                "report_uri": summary["report_uri"],
            }
        )
        mlflow.log_params(
            {
                "psi_threshold": summary["psi_threshold"],
                "window_start": plan.window_start,
                "window_end": plan.window_end,
                "sampled": summary["sampled"],
            }
        )
        mlflow.log_metrics(
            {
                "max_psi": summary["max_psi"],
                "prediction_psi": summary["prediction_psi"],
                "drifted_share": summary["drifted_share"],
                "current_rows": summary["rows"]["current"],
                "evaluated_rows": summary["rows"]["evaluated"],
                "skipped_objects": summary["skipped_objects"]["count"],
                **{f"psi.{name}": value for name, value in summary["feature_psi"].items()},
            }
        )
        mlflow.log_dict(summary, "drift/metrics.json")
        mlflow.log_text(html.decode(), "drift/report.html")
        info = run.info
    return {
        "mlflow_run_id": info.run_id,
        "mlflow_run_url": storage.mlflow_run_url(tracking_uri, info.experiment_id, info.run_id),
        "report_url": storage.mlflow_artifact_url(tracking_uri, info.run_id, "drift/report.html"),
    }


def record_check(
    store: Store, plan: CheckPlan, dag_run_id: str, summary: dict[str, Any] | None, decision: retrain.Decision
) -> None:
    """The check's row in ``drift_check``, with its decision and the run it triggered."""
    row = monitoring_store.drift_check_row(
        dag_run_id=dag_run_id,
        dataset=plan.dataset,
        model_name=plan.model_name,
        window_start=plan.window_start,
        window_end=plan.window_end,
        summary=summary,
        decision=decision.outcome,
        reason=decision.reason,
        checked_at=monitoring_store.now(),
        triggered_run_id=decision.run_id,
    )
    monitoring_store.write(store, "drift_check", [row])


def decide_retraining(
    client: Any, store: Store, plan: CheckPlan, summary: dict[str, Any], dag_run_id: str, active_training_runs: int
) -> retrain.Decision:
    """Apply the retrain rule to this check's drift; record the check and, when it triggers, the retrain.

    The history (consecutive checks) and the last triggered retrain (the cooldown) come from the
    monitoring store, filtered by dataset in SQL; the run's ``ds`` is the newest labelled day.
    """
    config = plan.config
    history = monitoring_store.drift_history(store, plan.dataset, plan.window_end, limit=config.consecutive_checks)
    guard = retrain.StormGuard(
        active_training_runs=active_training_runs,
        last_retrain_at=monitoring_store.last_retrain_at(store, plan.dataset, plan.window_end),
        cooldown=dt.timedelta(minutes=config.cooldown_minutes),
    )
    signals = [drift_signal(summary, history, config.consecutive_checks)]
    if signals[0].ready:
        # A quality drop held back by storm protection joins: one run, both reasons (tasks.quality).
        from tasks.quality import held_quality_signal

        held = held_quality_signal(
            store, plan.dataset, plan.window_end_time, dt.timedelta(days=1), guard.last_retrain_at
        )
        signals += [held] if held is not None else []
    decision = retrain.decide(
        signals,
        dataset=plan.dataset,
        window_end=plan.window_end_time,
        guard=guard,
        labelled_day=newest_labelled_day(
            client, plan.settings.raw_bucket, plan.raw_prefix, plan.window_end_time.date().isoformat()
        ),
        window_days=config.retrain_window_days,
    )
    if decision.trigger:
        monitoring_store.log_retrain(store, decision, plan.model_name, plan.window_end, dag_run_id)
    record_check(store, plan, dag_run_id, summary, decision)
    log.info("drift decision: %s (%s)", decision.outcome, decision.reason)
    return decision


def decision_xcom(plan: CheckPlan, decision: retrain.Decision) -> dict[str, Any]:
    """The decision as the DAG hands it on: plus the dataset, its model and the training DAG a retrain goes to."""
    return {
        **decision.as_dict(),
        "dataset": plan.dataset,
        "model_name": plan.model_name,
        "training_dag_id": training_dag_id(plan.dataset),
    }
