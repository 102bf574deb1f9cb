"""The run plans: what one DAG run works on, resolved once, typed, and handed to every task.

A plan is built by a pure function from the settings (defaults, the Airflow Variable,
``NS_*``), the run's params, its day or window and the known dataset names; it goes to XCom
as a plain dict (``to_xcom``) and every later task rebuilds the same object from it
(``from_xcom``), so one run never mixes two configurations and no task re-reads settings.

* :class:`RunPlan`: the training DAG and the deploy DAG (dataset, day, model, settings,
  trigger, gate override, release action).
* :class:`CheckPlan`: the drift DAG (dataset, model, window, drift configuration).

Bad input (a ``ds`` that is not YYYY-MM-DD, an unknown dataset, a gate override without a
reason) raises :class:`PlanError` before anything is read or written.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tasks.config import Settings, model_name_for
from tasks.dataset_spec import DatasetSpec, load_spec
from tasks.datasets import NothingMonitored, champion_lookup, monitored_datasets
from tasks.deploy import parse_targets
from tasks.drift import DriftConfig, window
from tasks.layout import DayLayout, check_ds

log = logging.getLogger(__name__)

# Run conf fields that say why a training run exists; recorded on its MLflow run and model card.
TRIGGER_FIELDS = ("reason", "signals", "drift_report_uri", "max_psi", "drifted_features", "quality", "feedback")
GATE_OVERRIDES = ("promote", "reject")
RELEASE_ACTIONS = ("redeploy", "rollback")
# Drift configuration a drift run's params may override (include/drift.yaml holds the rest).
CHECK_OVERRIDES = ("psi_threshold", "window_hours", "min_rows", "cooldown_minutes")


class PlanError(ValueError):
    """The run's input cannot make a plan; the message names the field and what to do. Not retried."""


def check_dataset(name: str, known: Sequence[str]) -> str:
    """``name`` if it is one of the ``known`` dataset spec names, else a :class:`PlanError` listing them."""
    if name not in known:
        raise PlanError(
            f"unknown dataset {name!r}: a dataset is the name of a spec in include/datasets/ "
            f"(known: {', '.join(sorted(known))})"
        )
    return name


def _dataset(settings: Settings, params: Mapping[str, Any], known: Sequence[str]) -> Settings:
    return settings.replace(dataset=check_dataset(params.get("dataset") or settings.dataset, known))


def _run_type(run_type: Any) -> str:
    return str(getattr(run_type, "value", run_type))


def _settings_from(values: Mapping[str, Any]) -> Settings:
    return Settings(**values)


@dataclass(frozen=True)
class RunPlan:
    """One training or deploy run.

    Attributes:
        dataset: Dataset spec name.
        ds: The day (YYYY-MM-DD) whose data the run reads and whose partitions it writes.
        model_name: Registered model name (the setting, else the dataset's name).
        settings: The resolved settings (buckets, connection ids, MLflow, deploy targets).
        window_days: Train on the snapshots of the last N days ending at ``ds``.
        trigger: ``run_type`` plus the trigger fields given (``TRIGGER_FIELDS``).
        force_gate: ``promote`` or ``reject`` overrides the gate (with ``force_reason``).
        force_reason: Why the gate is overridden (logged).
        smoke_min_accuracy: Overrides the smoke test's minimum accuracy.
        action: The deploy DAG's release action (``redeploy`` or ``rollback``); None when training.
        action_reason: Why (required for a rollback; kept on the demoted model version).
    """

    dataset: str
    ds: str
    model_name: str
    settings: Settings
    window_days: int = 1
    trigger: Mapping[str, Any] = field(default_factory=dict)
    force_gate: str | None = None
    force_reason: str | None = None
    smoke_min_accuracy: float | None = None
    action: str | None = None
    action_reason: str | None = None

    @functools.cached_property
    def spec(self) -> DatasetSpec:
        return load_spec(self.dataset)

    @functools.cached_property
    def layout(self) -> DayLayout:
        """The S3 locations of this run's day."""
        return DayLayout(self.settings, self.spec, self.ds)

    @property
    def deploy_targets(self) -> tuple[str, ...]:
        return parse_targets(self.settings.deploy_targets)

    def to_xcom(self) -> dict[str, Any]:
        """Plain JSON values (the settings as a mapping of their own), plus what operators template.

        ``raw_key_pattern`` (the S3 sensor's key) is derived from the rest and dropped again by
        :meth:`from_xcom`.
        """
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["settings"] = dataclasses.asdict(self.settings)
        values["trigger"] = dict(self.trigger)
        values["raw_key_pattern"] = self.layout.raw_key_pattern
        return values

    @classmethod
    def from_xcom(cls, values: Mapping[str, Any]) -> RunPlan:
        fields = {f.name for f in dataclasses.fields(cls)}
        kept = {key: value for key, value in values.items() if key in fields}
        return cls(**{**kept, "settings": _settings_from(values["settings"])})

    def training_lineage(self, features: Mapping[str, Any], validation_uri: str) -> dict[str, Any]:
        """What the model was trained on (``lineage.json`` of its MLflow run)."""
        return {
            "ds": self.ds,
            "window_days": self.window_days,
            "snapshot_uris": features["snapshot_uris"],
            "content_hashes": features["content_hashes"],
            "validation_uri": validation_uri,
            "features_uri": features["features_uri"],
            **({"feedback": features["feedback"]} if features.get("feedback") else {}),
        }

    def training_tags(self, dag_id: str, run_id: str) -> dict[str, str]:
        """The MLflow run's tags: the Airflow run, the day, and why it ran."""
        run_type = self.trigger.get("run_type", "manual")
        tags = {
            "airflow_dag_id": dag_id,
            "airflow_run_id": run_id,
            "ds": self.ds,
            "dataset": self.dataset,
            "trigger": run_type,
            "trigger_reason": str(self.trigger.get("reason", "scheduled" if run_type == "scheduled" else "manual")),
        }
        if self.trigger.get("drift_report_uri"):
            tags["drift_report_uri"] = str(self.trigger["drift_report_uri"])
        return tags

    def evaluation_data(self, features: Mapping[str, Any], validation_uri: str) -> dict[str, Any]:
        """The data section of the model card."""
        return {
            "dataset": self.dataset,
            "ds": self.ds,
            "window_days": self.window_days,
            "snapshot_uris": features["snapshot_uris"],
            "content_hashes": features["content_hashes"],
            "train_rows": features["train_rows"],
            "test_rows": features["test_rows"],
            "validation_uri": validation_uri,
        }


def plan_run(
    settings: Settings, params: Mapping[str, Any] | None, ds: str, run_type: Any, known_datasets: Sequence[str]
) -> RunPlan:
    """The plan of a training run: run params override the settings.

    Args:
        settings: Defaults + the ``network_security_config`` Variable + ``NS_*``.
        params: The run's params (conf): ``ds``, ``dataset``, ``window_days``, trigger fields,
            ``force_gate`` / ``force_reason``, ``smoke_min_accuracy``.
        ds: The run's logical day (used when the params give none).
        run_type: The DAG run's type (``manual``, ``scheduled``, ...).
        known_datasets: Names of the dataset specs.

    Raises:
        PlanError: ``ds`` is not YYYY-MM-DD, the dataset is unknown, a gate override has no
            reason or is not promote/reject, or ``window_days`` is not a positive whole number.
    """
    params = dict(params or {})
    model_name = model_name_for(settings, params.get("dataset") or settings.dataset)
    settings = _dataset(settings, params, known_datasets)
    try:
        day = check_ds(params.get("ds") or ds)
    except ValueError as err:
        raise PlanError(str(err)) from None
    force_gate = params.get("force_gate") or None
    if force_gate is not None and force_gate not in GATE_OVERRIDES:
        raise PlanError(f"force_gate must be one of {list(GATE_OVERRIDES)}, got {force_gate!r}")
    force_reason = (params.get("force_reason") or "").strip() or None
    if force_gate and not force_reason:
        raise PlanError("force_gate needs force_reason: say why the gate is overridden (it is logged)")
    window_days = 1 if params.get("window_days") is None else params["window_days"]
    if isinstance(window_days, bool) or not isinstance(window_days, int) or window_days < 1:
        raise PlanError(f"window_days must be a whole number of days >= 1, got {window_days!r}")
    trigger = {"run_type": _run_type(run_type)}
    trigger.update({key: params[key] for key in TRIGGER_FIELDS if params.get(key) not in (None, "", [])})
    smoke = params.get("smoke_min_accuracy")
    plan = RunPlan(
        dataset=settings.dataset,
        ds=day,
        model_name=model_name,
        settings=settings,
        window_days=window_days,
        trigger=trigger,
        force_gate=force_gate,
        force_reason=force_reason,
        smoke_min_accuracy=None if smoke is None else float(smoke),
    )
    log.info("run plan: %s", plan.to_xcom())
    return plan


def plan_release(
    settings: Settings, params: Mapping[str, Any] | None, ds: str, run_type: Any, known_datasets: Sequence[str]
) -> RunPlan:
    """The plan of a deploy DAG run: ``action`` (redeploy | rollback) and, for a rollback, its ``reason``.

    Raises:
        PlanError: An unknown action, a rollback without a reason, an unknown dataset.
    """
    params = dict(params or {})
    action = params.get("action") or "redeploy"
    if action not in RELEASE_ACTIONS:
        raise PlanError(f"action must be one of {list(RELEASE_ACTIONS)}, got {action!r}")
    reason = (params.get("reason") or "").strip() or None
    if action == "rollback" and not reason:
        raise PlanError("a rollback needs a reason (param `reason`): it is kept on the demoted model version")
    plan = plan_run(settings, {"dataset": params.get("dataset")}, ds, run_type, known_datasets)
    return dataclasses.replace(plan, action=action, action_reason=reason)


@dataclass(frozen=True)
class CheckPlan:
    """One drift check.

    Attributes:
        dataset: Dataset spec name.
        model_name: Registered model whose champion is checked.
        raw_prefix: The dataset's folder in the raw bucket (where labelled days land).
        settings: The resolved settings.
        config: ``include/drift.yaml`` with the run's overrides.
        window_start: First hour of the window (ISO 8601, UTC).
        window_end: End of the window, exclusive (the run's data interval end, ISO 8601, UTC).
        partitions: The window's ``dt=YYYY-MM-DD/HH`` partitions of the prediction log, oldest first.
        run_type: The DAG run's type.
    """

    dataset: str
    model_name: str
    raw_prefix: str
    settings: Settings
    config: DriftConfig
    window_start: str
    window_end: str
    partitions: tuple[str, ...]
    run_type: str = "manual"

    @property
    def window_end_time(self) -> dt.datetime:
        return dt.datetime.fromisoformat(self.window_end)

    @functools.cached_property
    def spec(self) -> DatasetSpec:
        return load_spec(self.dataset)

    def to_xcom(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["settings"] = dataclasses.asdict(self.settings)
        values["config"] = dataclasses.asdict(self.config)
        values["partitions"] = list(self.partitions)
        return values

    @classmethod
    def from_xcom(cls, values: Mapping[str, Any]) -> CheckPlan:
        return cls(
            **{
                **values,
                "settings": _settings_from(values["settings"]),
                "config": DriftConfig(**values["config"]),
                "partitions": tuple(values["partitions"]),
            }
        )


def plan_check(
    settings: Settings,
    params: Mapping[str, Any] | None,
    window_end: dt.datetime,
    run_type: Any,
    known_datasets: Sequence[str],
    config: DriftConfig,
) -> CheckPlan:
    """The plan of a drift check: run params override the settings' dataset and the drift configuration.

    Raises:
        PlanError: An unknown dataset or an invalid override (a non-positive threshold, ...).
    """
    params = dict(params or {})
    model_name = model_name_for(settings, params.get("dataset") or settings.dataset)
    settings = _dataset(settings, params, known_datasets)
    try:
        config = config.replace(**{key: params.get(key) for key in CHECK_OVERRIDES})
    except (TypeError, ValueError) as err:
        raise PlanError(f"drift check params: {err}") from None
    spec = load_spec(settings.dataset)
    span = window(window_end, config.window_hours)
    plan = CheckPlan(
        dataset=spec.name,
        model_name=model_name,
        raw_prefix=spec.raw_prefix,
        settings=settings,
        config=config,
        window_start=span.start.isoformat(),
        window_end=span.end.isoformat(),
        partitions=span.partitions,
        run_type=_run_type(run_type),
    )
    log.info("drift check plan: %s", {k: v for k, v in plan.to_xcom().items() if k != "partitions"})
    return plan


def plan_checks(
    settings: Settings,
    params: Mapping[str, Any] | None,
    window_end: dt.datetime,
    run_type: Any,
    known_datasets: Sequence[str],
    has_champion: Callable[[str], bool] | None = None,
    config_for: Callable[..., DriftConfig] | None = None,
) -> list[CheckPlan]:
    """One drift check per monitored dataset (``tasks.datasets.monitored_datasets``), each with its own config.

    Args:
        config_for: The drift configuration of a dataset, ``config_for(dataset=name)``; default
            ``tasks.drift.load_drift_config`` (``include/drift.yaml`` with its overrides).
        has_champion: Whether a registered model has a champion; default: asks the settings' MLflow
            registry (``tasks.datasets.champion_lookup``, which fails fast when the server is down).

    Raises:
        PlanError: An unknown dataset, an invalid override, or no dataset with a champion.
    """
    if config_for is None:
        from tasks.drift import load_drift_config as config_for
    params = dict(params or {})
    has_champion = has_champion or champion_lookup(settings.mlflow_tracking_uri)
    try:
        datasets = monitored_datasets(settings, known_datasets, has_champion, params.get("dataset"))
    except (NothingMonitored, ValueError) as err:
        raise PlanError(str(err)) from None
    return [
        plan_check(
            settings, {**params, "dataset": name}, window_end, run_type, known_datasets, config_for(dataset=name)
        )
        for name in datasets
    ]
