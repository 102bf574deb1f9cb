"""Drift logic without Airflow: Evidently's PSI against an independent computation, the
retrain rule, sampling, the window reader and the configuration."""

from __future__ import annotations

import datetime as dt
import io
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks import drift, storage
from tasks.datagen import DriftKnob, generate

UTC = dt.UTC
HOUR = dt.timedelta(hours=1)
CHAMPION = {"model_name": "network_security", "model_version": "3", "run_id": "abc", "snapshot_uris": ["s3://l/s"]}


# --- an independent PSI (the binning Evidently documents, written out here) ----------------


def _shares(values: np.ndarray, keys: list) -> np.ndarray:
    return np.array([(values == key).sum() / len(values) for key in keys], dtype=float)


def _fill_zeros(shares: np.ndarray) -> np.ndarray:
    nonzero = shares[shares > 0]
    floor = nonzero.min() / 1e6 if nonzero.min() <= 1e-4 else 1e-4
    return np.where(shares == 0, floor, shares)


def independent_psi(reference: pd.Series, current: pd.Series, numeric: bool) -> float:
    """PSI = sum((r - c) * ln(r / c)); categories: shares of each value seen in either sample;
    numeric columns with more than 20 values: Sturges bins over both samples."""
    ref, cur = reference.to_numpy(), current.to_numpy()
    if numeric and reference.nunique() > 20:
        edges = np.histogram_bin_edges(np.concatenate([ref, cur]), bins="sturges")
        r = np.histogram(ref, edges)[0] / len(ref)
        c = np.histogram(cur, edges)[0] / len(cur)
    else:
        keys = sorted(set(np.unique(ref)) | set(np.unique(cur)))
        r, c = _shares(ref, keys), _shares(cur, keys)
    r, c = _fill_zeros(r), _fill_zeros(c)
    return float(np.sum((r - c) * np.log(r / c)))


def _exact(shares: dict[int, float], rows: int, seed: int) -> np.ndarray:
    values = np.concatenate([np.full(round(rows * share), value, dtype=np.int8) for value, share in shares.items()])
    return np.random.default_rng(seed).permutation(values)


def _scored(frame: pd.DataFrame, spec, seed: int) -> pd.DataFrame:
    """A stand-in for the champion's probability: a fixed logistic score of the features."""
    weights = np.random.default_rng(seed).normal(size=len(spec.feature_names))
    logits = frame[spec.feature_names].to_numpy(dtype=float) @ weights / 4
    return frame.assign(**{drift.PREDICTION_COLUMN: (1 / (1 + np.exp(-logits))).astype("float32")})


@pytest.fixture(scope="module")
def worlds(network_spec):
    """Reference and current frames of the default dataset: undrifted and drifted."""
    reference = _scored(generate(network_spec, 20_000, seed=1), network_spec, seed=0)
    calm = _scored(generate(network_spec, 20_000, seed=2), network_spec, seed=0)
    drifted = _scored(generate(network_spec, 20_000, seed=3, knob=DriftKnob(feature_drift=1.0)), network_spec, seed=0)
    return reference, calm, drifted


def test_psi_of_exact_proportions_is_the_textbook_value(network_spec):
    names = network_spec.feature_names
    rows = 10_000
    reference = pd.DataFrame({n: _exact({-1: 0.3, 0: 0.2, 1: 0.5}, rows, i) for i, n in enumerate(names)})
    current = reference.copy()
    current[names[0]] = _exact({-1: 0.1, 0: 0.2, 1: 0.7}, rows, 99)
    probability = np.linspace(0.01, 0.99, rows, dtype="float32")
    reference[drift.PREDICTION_COLUMN] = probability
    current[drift.PREDICTION_COLUMN] = probability

    _, psi = drift.psi_report(reference, current, network_spec, threshold=0.25)

    textbook = (0.3 - 0.1) * np.log(0.3 / 0.1) + (0.5 - 0.7) * np.log(0.5 / 0.7)  # 0.2870
    assert psi[names[0]] == pytest.approx(textbook, abs=1e-9)
    assert all(psi[n] == pytest.approx(0.0, abs=1e-12) for n in names[1:])
    assert psi[drift.PREDICTION_COLUMN] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("which", ["calm", "drifted"])
def test_psi_matches_an_independent_computation(network_spec, worlds, which):
    reference, calm, drifted = worlds
    current = calm if which == "calm" else drifted

    _, psi = drift.psi_report(reference, current, network_spec, threshold=0.25)

    for name in network_spec.feature_names:
        assert psi[name] == pytest.approx(independent_psi(reference[name], current[name], numeric=False), rel=1e-9)
    expected = independent_psi(reference[drift.PREDICTION_COLUMN], current[drift.PREDICTION_COLUMN], numeric=True)
    assert psi[drift.PREDICTION_COLUMN] == pytest.approx(expected, rel=1e-6)


def test_numeric_features_are_binned_like_the_independent_computation(flows_spec):
    reference = _scored(generate(flows_spec, 5_000, seed=1), flows_spec, seed=0)
    current = _scored(generate(flows_spec, 5_000, seed=2, knob=DriftKnob(feature_drift=1.0)), flows_spec, seed=0)

    _, psi = drift.psi_report(reference, current, flows_spec, threshold=0.25)

    for name in [*flows_spec.feature_names, drift.PREDICTION_COLUMN]:
        assert psi[name] == pytest.approx(independent_psi(reference[name], current[name], numeric=True), rel=1e-6)


def test_summary_of_a_calm_and_a_drifted_window(network_spec, worlds):
    reference, calm, drifted = worlds
    summaries = {}
    for name, current in (("calm", calm), ("drifted", drifted)):
        _, psi = drift.psi_report(reference, current, network_spec, threshold=0.25)
        summaries[name] = drift.summarize(
            psi, 0.25, window={"end": "x"}, rows={"current": 20_000, "evaluated": 20_000, "reference": 20_000},
            champion=CHAMPION,
        )  # fmt: skip
    calm_summary, drifted_summary = summaries["calm"], summaries["drifted"]
    assert not calm_summary["drift_detected"] and calm_summary["drifted_features"] == []
    assert calm_summary["max_psi"] < 0.1
    assert drifted_summary["drift_detected"]
    assert drifted_summary["drifted_features"], "the drift knob at 1.0 must move some features past 0.25"
    psis = [drifted_summary["feature_psi"][f] for f in drifted_summary["drifted_features"]]
    assert psis == sorted(psis, reverse=True) and min(psis) >= 0.25
    assert drifted_summary["drifted_share"] == round(len(psis) / 30, 4)
    assert drifted_summary["sampled"] is False
    json.dumps(drifted_summary)  # the summary is stored as JSON


def test_prediction_drift_alone_is_drift():
    psi = {"a": 0.01, "b": 0.02, drift.PREDICTION_COLUMN: 0.3}
    summary = drift.summarize(
        psi, 0.25, window={}, rows={"current": 10, "evaluated": 5, "reference": 10}, champion=CHAMPION
    )
    assert summary["drift_detected"] and summary["drifted_features"] == [] and summary["max_psi"] == 0.3
    assert summary["sampled"] is True
    assert "prediction PSI 0.300" in drift.retrain_reason(summary)


# --- sampling -------------------------------------------------------------------------------


def test_sample_is_uniform_seeded_and_keeps_order():
    table = pa.table({"i": np.arange(100_000)})
    first, second = drift.sample(table, 1_000, seed=0), drift.sample(table, 1_000, seed=0)
    assert first.num_rows == 1_000 and first.equals(second)
    values = first["i"].to_numpy()
    assert (np.diff(values) > 0).all()
    assert 40_000 < values.mean() < 60_000  # uniform over the whole window, not its head
    assert drift.sample(table, 200_000, seed=0) is table


@pytest.mark.parametrize("knob", [0.0, 0.5, 1.0], ids=["calm", "mild", "strong"])
def test_sampling_keeps_the_decision(network_spec, worlds, knob):
    reference = worlds[0]
    current = _scored(generate(network_spec, 200_000, seed=7, knob=DriftKnob(feature_drift=knob)), network_spec, 0)
    full = pa.Table.from_pandas(current, preserve_index=False)
    sampled = drift.sample(full, 20_000, seed=0).to_pandas()

    _, psi_full = drift.psi_report(reference, current, network_spec, threshold=0.25)
    _, psi_sampled = drift.psi_report(reference, sampled, network_spec, threshold=0.25)

    def decision(psi):
        summary = drift.summarize(
            psi, 0.25, window={}, rows={"current": 1, "evaluated": 1, "reference": 1}, champion=CHAMPION
        )
        return summary["drift_detected"], summary["drifted_features"]

    assert decision(psi_sampled) == decision(psi_full)


# --- the decision -----------------------------------------------------------------------------


def test_retrain_reason_names_the_worst_features():
    summary = {
        "drifted_features": [f"f{i}" for i in range(7)],
        "max_psi": 1.9,
        "psi_threshold": 0.25,
        "prediction_psi": 0.4,
    }
    reason = drift.retrain_reason(summary)
    assert reason.startswith("drift: max PSI 1.900 >= 0.25")
    assert "f0, f1, f2, f3, f4 and 2 more" in reason


# --- the window -----------------------------------------------------------------------------


def test_window_covers_the_hours_up_to_the_end():
    scheduled = dt.datetime(2026, 11, 23, 2, tzinfo=UTC)  # an hourly run: the hours before its end
    manual = dt.datetime(2026, 11, 23, 1, 30, tzinfo=UTC)  # a manual run: the current hour too
    expected = ("dt=2026-11-22/23", "dt=2026-11-23/00", "dt=2026-11-23/01")
    assert drift.window(scheduled, 3).partitions == expected
    assert drift.window(manual, 3).partitions == expected
    assert drift.window(manual.astimezone(dt.timezone(dt.timedelta(hours=-5))), 3).partitions == expected
    assert len(drift.window(scheduled, 24).partitions) == 24
    span = drift.window(manual.astimezone(dt.timezone(dt.timedelta(hours=-5))), 3)
    assert span.start == dt.datetime(2026, 11, 22, 23, tzinfo=UTC)  # the first partition's hour
    assert span.end == manual and span.end.tzinfo == UTC


def _records(spec, rows: int, version: str, model: str = "network_security") -> list[dict]:
    frame = generate(spec, rows, seed=5)
    records = json.loads(frame[spec.feature_names].to_json(orient="records"))
    extra = {"request_id": "x", "label": 1, "probability": 0.25, "model_name": model, "model_version": version}
    return [{**r, **extra} for r in records]


def test_read_object_projects_and_casts_jsonl_and_parquet(network_spec):
    schema = drift.current_schema(network_spec)
    records = _records(network_spec, 50, "3")
    jsonl = "\n".join(json.dumps(r) for r in records).encode()
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(records), buffer)

    from_json = drift.read_object(jsonl, "a.jsonl", schema)
    from_parquet = drift.read_object(buffer.getvalue(), "a.parquet", schema)

    assert from_json.schema == schema and from_json.equals(from_parquet)
    assert from_json.num_rows == 50
    assert pa.types.is_int8(from_json.schema.field(network_spec.feature_names[0]).type)
    with pytest.raises(ValueError, match="expected .parquet or .jsonl"):
        drift.read_object(b"", "a.csv", schema)


def _put(client, key: str, records: list[dict]) -> None:
    body = "\n".join(json.dumps(r) for r in records).encode()
    storage.put_bytes(client, storage.S3Location("lake", key), body)


def test_read_window_keeps_the_champions_rows_of_the_window(mock_s3, network_spec):
    mock_s3.create_bucket(Bucket="lake")
    # The legacy shared log (records carry model_name) ...
    _put(mock_s3, "predictions/dt=2026-11-23/10/a.jsonl", _records(network_spec, 30, "3"))
    _put(mock_s3, "predictions/dt=2026-11-23/11/b.jsonl", _records(network_spec, 20, "2"))  # the previous champion
    _put(mock_s3, "predictions/dt=2026-11-23/11/c.jsonl", _records(network_spec, 10, "3"))
    _put(mock_s3, "predictions/dt=2026-11-23/11/e.jsonl", _records(network_spec, 5, "3", model="another_model"))
    _put(mock_s3, "predictions/dt=2026-11-23/09/d.jsonl", _records(network_spec, 99, "3"))  # outside the window
    # ... and the per-model layout the server writes now, for this model and another one.
    _put(mock_s3, "predictions/network_security/dt=2026-11-23/11/f.jsonl", _records(network_spec, 7, "3"))
    _put(mock_s3, "predictions/another_model/dt=2026-11-23/11/g.jsonl", _records(network_spec, 9, "3", "another_model"))

    partitions = ["dt=2026-11-23/10", "dt=2026-11-23/11"]
    champion = ("network_security", "3")
    table, read, skipped = drift.read_window(mock_s3, "lake", "predictions", partitions, network_spec, champion)

    assert (table.num_rows, read, skipped) == (47, 72, ())
    assert set(table[drift.VERSION_COLUMN].to_pylist()) == {"3"}
    assert set(table[drift.MODEL_COLUMN].to_pylist()) == {"network_security"}
    everything = drift.read_window(mock_s3, "lake", "predictions", partitions, network_spec, None)
    assert everything.table.num_rows == everything.read_rows == 65  # no model: the legacy log only
    empty = drift.read_window(mock_s3, "lake", "predictions", ["dt=2026-01-01/00"], network_spec, champion)
    assert (empty.table.num_rows, empty.read_rows) == (0, 0)


def test_window_prefixes_are_the_models_folder_then_the_legacy_one():
    assert drift.window_prefixes("predictions", "m", "dt=2026-01-01/00") == [
        "predictions/m/dt=2026-01-01/00/", "predictions/dt=2026-01-01/00/",
    ]  # fmt: skip
    assert drift.window_prefixes("", None, "dt=2026-01-01/00") == ["dt=2026-01-01/00/"]


def test_an_unreadable_object_is_skipped_and_counted(mock_s3, network_spec):
    mock_s3.create_bucket(Bucket="lake")
    hour = "dt=2026-11-23/10"
    _put(mock_s3, f"predictions/network_security/{hour}/good.jsonl", _records(network_spec, 30, "3"))
    storage.put_bytes(mock_s3, storage.S3Location("lake", f"predictions/network_security/{hour}/torn.jsonl"), b'{"URL')
    storage.put_bytes(mock_s3, storage.S3Location("lake", f"predictions/{hour}/junk.parquet"), b"not parquet")
    storage.put_bytes(mock_s3, storage.S3Location("lake", f"predictions/{hour}/notes.txt"), b"hello")
    wrong = [{k: v for k, v in r.items() if k != "probability"} for r in _records(network_spec, 4, "3")]
    _put(mock_s3, f"predictions/{hour}/no_probability.jsonl", wrong)

    found = drift.read_window(mock_s3, "lake", "predictions", [hour], network_spec, ("network_security", "3"))

    assert found.table.num_rows == 30
    skipped = {entry.split(":", 1)[0] for entry in found.skipped}
    assert skipped >= {
        f"predictions/network_security/{hour}/torn.jsonl", f"predictions/{hour}/junk.parquet",
        f"predictions/{hour}/notes.txt",
    }  # fmt: skip
    summary = drift.summarize(
        {n: 0.01 for n in [*network_spec.feature_names, drift.PREDICTION_COLUMN]},
        0.25,
        window={},
        rows={"current": 30, "evaluated": 30, "reference": 30},
        champion=CHAMPION,
        skipped_objects=found.skipped,
    )
    assert summary["skipped_objects"]["count"] == len(found.skipped) >= 3
    assert summary["skipped_objects"]["first"][0] == found.skipped[0]


def test_newest_labelled_day_is_on_or_before_the_window(mock_s3):
    mock_s3.create_bucket(Bucket="raw")
    for day in ("2026-11-20", "2026-11-22", "2026-11-25"):
        storage.put_bytes(mock_s3, storage.S3Location("raw", f"network_data/ds={day}/part-0000.csv"), b"x")
    assert drift.newest_labelled_day(mock_s3, "raw", "network_data", "2026-11-23") == "2026-11-22"
    assert drift.newest_labelled_day(mock_s3, "raw", "network_data", "2026-11-01") is None


# --- configuration --------------------------------------------------------------------------


def test_the_shipped_configuration_is_the_documented_default():
    config = drift.load_drift_config()
    assert config.psi_threshold == 0.25 and config.consecutive_checks == 1
    assert config.replace(psi_threshold=None, min_rows=10).min_rows == 10


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("psi_threshold: 0\n", "psi_threshold must be positive"),
        ("min_rows: 0\n", "min_rows must be at least 1"),
        ("cooldown_minutes: -5\n", "cooldown_minutes must be 0 or more"),
        ("psi_treshold: 0.2\n", "unknown key"),
        ("- a\n", "expected a mapping"),
        ("datasets:\n  flows:\n    min_rows: 0\n", "min_rows must be at least 1"),
        ("datasets:\n  flows:\n    psi_treshold: 0.2\n", "datasets.flows: unknown key"),
        ("datasets: [flows]\n", "'datasets' maps dataset names to overrides"),
    ],
)
def test_bad_configuration_names_the_file_and_the_problem(tmp_path, text, message):
    path = tmp_path / "drift.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as raised:
        drift.load_drift_config(path, dataset="other")  # a bad override fails every dataset's check
    assert str(path) in str(raised.value)


def test_each_dataset_has_its_own_configuration(tmp_path):
    path = tmp_path / "drift.yaml"
    path.write_text(
        "psi_threshold: 0.3\nmin_rows: 400\ndatasets:\n  flows: {psi_threshold: 0.1, cooldown_minutes: 0}\n"
    )
    flows, other = drift.load_drift_config(path, dataset="flows"), drift.load_drift_config(path, dataset="other")
    assert (flows.psi_threshold, flows.cooldown_minutes, flows.min_rows) == (0.1, 0, 400)
    assert (other.psi_threshold, other.cooldown_minutes, other.min_rows) == (0.3, 360, 400)
    assert drift.load_drift_config(path) == other
    # The shipped file: intrusion_flows' smaller drops are checked from 200 rows.
    assert drift.load_drift_config(dataset="intrusion_flows").min_rows == 200
    assert drift.load_drift_config(dataset="network_security").min_rows == 500


# --- the decision of a check, on a real (SQLite) monitoring store ---------------------------------


def _plan(window_end: dt.datetime, cooldown_minutes: int | None = None, consecutive_checks: int = 1):
    from tasks.config import Settings
    from tasks.plan import plan_check

    settings = Settings(raw_bucket="raw", lake_bucket="lake")
    config = drift.load_drift_config().replace(consecutive_checks=consecutive_checks)
    params = {"window_hours": 1, "cooldown_minutes": cooldown_minutes}
    return plan_check(settings, params, window_end, "scheduled", ["network_security"], config)


def _summary(detected: bool) -> dict:
    return {
        "drift_detected": detected, "max_psi": 0.6 if detected else 0.01, "prediction_psi": 0.01,
        "psi_threshold": 0.25, "drifted_features": ["f1"] if detected else [], "report_uri": "s3://lake/r.html",
        "rows": {"current": 900, "evaluated": 900, "reference": 1000}, "champion": {"model_version": "1"},
    }  # fmt: skip


def test_decide_retraining_records_the_check_and_the_retrain(mock_s3, store):
    mock_s3.create_bucket(Bucket="raw")
    storage.put_bytes(mock_s3, storage.S3Location("raw", "network_data/ds=2026-11-22/part-0000.csv"), b"x")
    at = dt.datetime(2026, 11, 23, 12, tzinfo=UTC)

    calm = drift.decide_retraining(mock_s3, store, _plan(at - 2 * HOUR), _summary(False), "check-1", 0)
    decision = drift.decide_retraining(mock_s3, store, _plan(at), _summary(True), "check-2", 0)
    held = drift.decide_retraining(mock_s3, store, _plan(at + HOUR), _summary(True), "check-3", 0)
    lifted = drift.decide_retraining(mock_s3, store, _plan(at + 2 * HOUR, cooldown_minutes=0), _summary(True), "c4", 0)

    assert [d.outcome for d in (calm, decision, held, lifted)] == ["no_drift", "retrain", "cooldown", "retrain"]
    assert decision.run_id == "drift__network_security__2026-11-23T12:00:00"
    assert decision.conf["ds"] == "2026-11-22" and decision.conf["drift_report_uri"] == "s3://lake/r.html"
    checks = {row["dag_run_id"]: row for row in store.table("drift_check")}
    assert checks["check-2"]["triggered_run_id"] == decision.run_id and checks["check-2"]["decision"] == "retrain"
    assert checks["check-3"]["decision"] == "cooldown" and checks["check-3"]["triggered_run_id"] is None
    retrains = store.table("retrain_log")
    assert [r["run_id"] for r in retrains] == [decision.run_id, lifted.run_id]
    assert json.loads(retrains[0]["conf_json"]) == decision.conf


def test_decide_retraining_needs_k_consecutive_checks_of_the_same_dataset(mock_s3, store):
    mock_s3.create_bucket(Bucket="raw")
    storage.put_bytes(mock_s3, storage.S3Location("raw", "network_data/ds=2026-11-22/part-0000.csv"), b"x")
    at = dt.datetime(2026, 11, 23, 12, tzinfo=UTC)
    outcomes = [
        drift.decide_retraining(mock_s3, store, _plan(at + n * HOUR, consecutive_checks=2), _summary(True), f"r{n}", 0)
        for n in range(2)
    ]
    assert [d.outcome for d in outcomes] == ["drift_pending", "retrain"]


def test_decide_retraining_without_a_labelled_day(mock_s3, store):
    mock_s3.create_bucket(Bucket="raw")
    decision = drift.decide_retraining(
        mock_s3, store, _plan(dt.datetime(2026, 11, 23, tzinfo=UTC)), _summary(True), "r", 0
    )
    assert decision.outcome == "no_labelled_data" and store.table("retrain_log") == []


def test_drift_signal_carries_the_reason_and_the_evidence():
    signal = drift.drift_signal(_summary(True), [True, False], 2)
    assert (signal.kind, signal.fired, signal.history, signal.consecutive) == ("drift", True, (True, False), 2)
    assert signal.reason.startswith("drift: max PSI 0.600 >= 0.25")
    assert signal.evidence == {"drift_report_uri": "s3://lake/r.html", "max_psi": 0.6, "drifted_features": ["f1"]}
