"""The run plans: params against settings, bad input refused before anything runs, the XCom round trip."""

from __future__ import annotations

import datetime as dt

import pytest

from tasks.config import Settings
from tasks.drift import DriftConfig
from tasks.plan import CheckPlan, PlanError, RunPlan, plan_check, plan_checks, plan_release, plan_run

KNOWN = ["intrusion_flows", "network_security"]
SETTINGS = Settings(lake_bucket="lake", raw_bucket="raw", monitoring_conn_id="store_conn", aws_conn_id="aws_conn")


def run(params=None, ds="2026-01-31", settings=SETTINGS, run_type="manual") -> RunPlan:
    return plan_run(settings, params, ds, run_type, KNOWN)


@pytest.mark.parametrize(
    ("params", "field", "expected"),
    [
        ({}, "dataset", "network_security"),
        ({"dataset": "intrusion_flows"}, "dataset", "intrusion_flows"),
        ({}, "ds", "2026-01-31"),
        ({"ds": "2026-02-03"}, "ds", "2026-02-03"),
        ({}, "model_name", "network_security"),
        ({"dataset": "intrusion_flows"}, "model_name", "intrusion_flows"),
        ({}, "window_days", 1),
        ({"window_days": 3}, "window_days", 3),
        ({"force_gate": "promote", "force_reason": " incident 7 "}, "force_gate", "promote"),
        ({"force_gate": "promote", "force_reason": " incident 7 "}, "force_reason", "incident 7"),
        ({"smoke_min_accuracy": 0.5}, "smoke_min_accuracy", 0.5),
        ({}, "smoke_min_accuracy", None),
    ],
)
def test_params_override_settings(params, field, expected):
    assert getattr(run(params), field) == expected


def test_the_setting_model_name_names_the_settings_datasets_model_only():
    renamed = SETTINGS.replace(model_name="renamed")
    assert run(settings=renamed).model_name == "renamed"
    # Another dataset keeps its own model: two datasets never share a champion.
    assert run({"dataset": "intrusion_flows"}, settings=renamed).model_name == "intrusion_flows"


def test_a_dataset_param_changes_the_settings_the_layout_uses():
    plan = run({"dataset": "intrusion_flows"})
    assert plan.settings.dataset == "intrusion_flows"
    assert plan.layout.snapshot.uri == "s3://lake/snapshots/intrusion_flows/ds=2026-01-31/data.parquet"
    assert plan.layout.raw_key_pattern.startswith(plan.spec.raw_prefix)


def test_trigger_records_the_run_type_and_the_given_fields_only():
    plan = run({"reason": "drift: max PSI 0.4", "signals": ["drift"], "max_psi": 0.4, "drifted_features": []})
    assert plan.trigger == {"run_type": "manual", "reason": "drift: max PSI 0.4", "signals": ["drift"], "max_psi": 0.4}
    enum_like = type("RunType", (), {"value": "scheduled"})()
    assert run(run_type=enum_like).trigger == {"run_type": "scheduled"}


@pytest.mark.parametrize(
    ("params", "ds", "words"),
    [
        ({}, "20260131", ["ds must be a day written YYYY-MM-DD", "'20260131'"]),
        ({}, "2026-W05-2", ["ds must be a day written YYYY-MM-DD", "'2026-W05-2'"]),
        ({"ds": "2026-02-30"}, "2026-01-31", ["'2026-02-30'"]),
        ({"ds": "31.01.2026"}, "2026-01-31", ["'31.01.2026'"]),
        ({"dataset": "../../etc/passwd"}, "2026-01-31", ["unknown dataset '../../etc/passwd'", "intrusion_flows"]),
        ({"dataset": "network_security.yaml"}, "2026-01-31", ["unknown dataset", "network_security"]),
        ({"force_gate": "promote"}, "2026-01-31", ["force_gate needs force_reason"]),
        ({"force_gate": "reject", "force_reason": "   "}, "2026-01-31", ["force_gate needs force_reason"]),
        ({"force_gate": "ship-it", "force_reason": "x"}, "2026-01-31", ["force_gate must be one of"]),
        ({"window_days": 0}, "2026-01-31", ["window_days must be a whole number"]),
        ({"window_days": 1.5}, "2026-01-31", ["window_days must be a whole number"]),
    ],
)
def test_bad_input_is_refused_naming_the_problem(params, ds, words):
    with pytest.raises(PlanError) as raised:
        run(params, ds=ds)
    for word in words:
        assert word in str(raised.value)


def test_the_plan_round_trips_through_xcom_as_plain_values():
    import json

    plan = run({"dataset": "intrusion_flows", "force_gate": "reject", "force_reason": "r", "reason": "x"})
    values = json.loads(json.dumps(plan.to_xcom()))  # what XCom stores
    assert values["settings"]["monitoring_conn_id"] == "store_conn"
    assert values["raw_key_pattern"] == plan.layout.raw_key_pattern
    again = RunPlan.from_xcom(values)
    assert again == plan
    assert again.layout == plan.layout


def test_training_tags_and_lineage_say_why_and_on_what():
    features = {
        "snapshot_uris": ["s3://lake/a"], "content_hashes": ["h"], "features_uri": "s3://lake/f/",
        "train_rows": 8, "test_rows": 2,
    }  # fmt: skip
    drift_run = run({"reason": "drift: x", "drift_report_uri": "s3://lake/drift/r.html"})
    tags = drift_run.training_tags("dag", "run-1")
    assert tags["trigger_reason"] == "drift: x" and tags["drift_report_uri"] == "s3://lake/drift/r.html"
    assert run(run_type="scheduled").training_tags("dag", "r")["trigger_reason"] == "scheduled"
    assert "drift_report_uri" not in run().training_tags("dag", "r")
    lineage = drift_run.training_lineage(features, "s3://lake/v.json")
    assert lineage == {
        "ds": "2026-01-31", "window_days": 1, "snapshot_uris": ["s3://lake/a"], "content_hashes": ["h"],
        "validation_uri": "s3://lake/v.json", "features_uri": "s3://lake/f/",
    }  # fmt: skip
    assert drift_run.evaluation_data(features, "v")["train_rows"] == 8


@pytest.mark.parametrize(
    ("params", "action", "reason"),
    [({}, "redeploy", None), ({"action": "rollback", "reason": " bad v7 "}, "rollback", "bad v7")],
)
def test_release_plans(params, action, reason):
    plan = plan_release(SETTINGS, params, "2026-01-31", "manual", KNOWN)
    assert (plan.action, plan.action_reason) == (action, reason)


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"action": "rollback"}, "a rollback needs a reason"),
        ({"action": "rollback", "reason": ""}, "a rollback needs a reason"),
        ({"action": "nuke"}, "action must be one of"),
        ({"dataset": "/tmp/x"}, "unknown dataset"),
    ],
)
def test_release_plans_refuse_bad_input(params, words):
    with pytest.raises(PlanError, match=words):
        plan_release(SETTINGS, params, "2026-01-31", "manual", KNOWN)


END = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)


def check(params=None) -> CheckPlan:
    return plan_check(SETTINGS, params, END, "scheduled", KNOWN, DriftConfig())


def test_check_plan_window_and_overrides():
    plan = check({"window_hours": 3, "psi_threshold": 0.1, "cooldown_minutes": 0})
    assert plan.partitions == ("dt=2026-11-23/09", "dt=2026-11-23/10", "dt=2026-11-23/11")
    assert plan.window_start == "2026-11-23T09:00:00+00:00"
    assert plan.window_end == "2026-11-23T12:00:00+00:00"
    assert (plan.config.psi_threshold, plan.config.cooldown_minutes, plan.config.min_rows) == (0.1, 0, 500)
    assert plan.raw_prefix == "network_data" and plan.model_name == "network_security"
    assert CheckPlan.from_xcom(plan.to_xcom()) == plan


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"dataset": "../x"}, "unknown dataset"),
        ({"psi_threshold": 0}, "psi_threshold must be positive"),
        ({"window_hours": 0}, "window_hours must be at least 1"),
        ({"cooldown_minutes": -1}, "cooldown_minutes must be 0 or more"),
    ],
)
def test_check_plan_refuses_bad_params(params, words):
    with pytest.raises(PlanError, match=words):
        check(params)


def checks(params=None, champions=("network_security", "intrusion_flows"), settings=SETTINGS) -> list[CheckPlan]:
    def config_for(dataset):
        return DriftConfig(psi_threshold=0.1) if dataset == "intrusion_flows" else DriftConfig()

    return plan_checks(settings, params, END, "scheduled", KNOWN, lambda model: model in champions, config_for)


def test_one_check_per_dataset_with_a_champion_each_with_its_configuration():
    flows, network = checks({"window_hours": 3})
    assert (flows.dataset, flows.model_name, flows.raw_prefix) == (
        "intrusion_flows",
        "intrusion_flows",
        "intrusion_flows",
    )
    assert (network.dataset, network.model_name, network.raw_prefix) == (
        "network_security",
        "network_security",
        "network_data",
    )
    assert (flows.config.psi_threshold, network.config.psi_threshold) == (0.1, 0.25)
    assert flows.partitions == network.partitions and len(flows.partitions) == 3  # the run's params hold for each
    assert flows.settings.dataset == "intrusion_flows" and network.settings.dataset == "network_security"
    assert [c.dataset for c in checks(champions=("intrusion_flows",))] == ["intrusion_flows"]


def test_a_renamed_model_is_looked_up_for_its_own_dataset_only():
    asked = []
    plan_checks(SETTINGS.replace(model_name="ns_test"), {}, END, "manual", KNOWN,
                lambda model: asked.append(model) or True, lambda dataset: DriftConfig())  # fmt: skip
    assert sorted(asked) == ["intrusion_flows", "ns_test"]


def test_a_named_dataset_is_checked_even_without_a_champion():
    (only,) = checks({"dataset": "intrusion_flows"}, champions=())
    assert only.dataset == "intrusion_flows"  # its check then says there is no champion and what to do


@pytest.mark.parametrize(
    ("params", "champions", "words"),
    [
        ({}, (), "no onboarded dataset has a champion"),
        ({"dataset": "../x"}, ("network_security",), "unknown dataset"),
        ({"psi_threshold": -1}, ("network_security",), "psi_threshold must be positive"),
    ],
)
def test_check_plans_refuse_bad_input_and_nothing_to_watch(params, champions, words):
    with pytest.raises(PlanError, match=words):
        checks(params, champions=champions)


def test_without_a_lookup_the_checks_ask_the_settings_registry_which_models_have_a_champion(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    for model in KNOWN:
        client.create_registered_model(model)
        client.create_model_version(model, source=(tmp_path / "model").as_uri())
    client.set_registered_model_alias("intrusion_flows", "champion", "1")  # network_security has none
    plans = plan_checks(SETTINGS.replace(mlflow_tracking_uri=uri), {}, END, "scheduled", KNOWN)
    assert [c.dataset for c in plans] == ["intrusion_flows"]
