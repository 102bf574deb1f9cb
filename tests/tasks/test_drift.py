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


# --- the decision rule ----------------------------------------------------------------------

END = dt.datetime(2026, 11, 23, 12, tzinfo=UTC)
HOUR = dt.timedelta(hours=1)


@pytest.mark.parametrize(
    ("detected", "previous", "k", "active", "last_trigger", "outcome"),
    [
        (False, [], 1, 0, None, "no_drift"),
        (False, [True, True], 2, 0, None, "no_drift"),
        (True, [], 1, 0, None, "retrain"),
        (True, [], 2, 0, None, "drift_pending"),
        (True, [False, True], 2, 0, None, "drift_pending"),
        (True, [True], 2, 0, None, "retrain"),
        (True, [True, True, False], 3, 0, None, "retrain"),
        (True, [], 1, 1, None, "training_active"),
        (True, [True], 2, 2, None, "training_active"),
        (True, [], 1, 0, END - 2 * HOUR, "cooldown"),
        (True, [], 1, 0, END - 6 * HOUR, "retrain"),  # the cooldown is over exactly at its end
        (True, [], 1, 0, END - 7 * HOUR, "retrain"),
        (True, [], 2, 1, END - HOUR, "drift_pending"),  # the rule first, then storm protection
    ],
)
def test_decision_rule(detected, previous, k, active, last_trigger, outcome):
    decision = drift.decide(
        detected,
        previous,
        consecutive_checks=k,
        active_training_runs=active,
        last_trigger_at=last_trigger,
        window_end=END,
        cooldown=dt.timedelta(hours=6),
    )
    assert decision.outcome == outcome
    assert decision.trigger is (outcome == "retrain")
    assert decision.reason


def test_trigger_run_id_is_one_per_window():
    other_zone = END.astimezone(dt.timezone(dt.timedelta(hours=2)))
    assert drift.trigger_run_id("network_security", END) == drift.trigger_run_id("network_security", other_zone)
    assert drift.trigger_run_id("network_security", END) == "drift__network_security__2026-11-23T12:00:00"
    assert drift.trigger_run_id("network_security", END + HOUR) != drift.trigger_run_id("network_security", END)


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


def test_window_partitions_cover_the_hours_up_to_the_end():
    scheduled = dt.datetime(2026, 11, 23, 2, tzinfo=UTC)  # an hourly run: the hours before its end
    manual = dt.datetime(2026, 11, 23, 1, 30, tzinfo=UTC)  # a manual run: the current hour too
    expected = ["dt=2026-11-22/23", "dt=2026-11-23/00", "dt=2026-11-23/01"]
    assert drift.window_partitions(scheduled, 3) == expected
    assert drift.window_partitions(manual, 3) == expected
    assert drift.window_partitions(manual.astimezone(dt.timezone(dt.timedelta(hours=-5))), 3) == expected
    assert len(drift.window_partitions(scheduled, 24)) == 24


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


def test_read_window_keeps_the_champions_rows_of_the_window(mock_s3, network_spec):
    mock_s3.create_bucket(Bucket="lake")

    def put(partition: str, name: str, records: list[dict]) -> None:
        body = "\n".join(json.dumps(r) for r in records).encode()
        storage.put_bytes(mock_s3, storage.S3Location("lake", f"predictions/{partition}/{name}.jsonl"), body)

    put("dt=2026-11-23/10", "a", _records(network_spec, 30, "3"))
    put("dt=2026-11-23/11", "b", _records(network_spec, 20, "2"))  # the previous champion
    put("dt=2026-11-23/11", "c", _records(network_spec, 10, "3"))
    put("dt=2026-11-23/11", "e", _records(network_spec, 5, "3", model="another_model"))  # shares the log
    put("dt=2026-11-23/09", "d", _records(network_spec, 99, "3"))  # outside the window

    partitions = ["dt=2026-11-23/10", "dt=2026-11-23/11"]
    champion = ("network_security", "3")
    table, read = drift.read_window(mock_s3, "lake", "predictions", partitions, network_spec, champion)

    assert (table.num_rows, read) == (40, 65)
    assert set(table[drift.VERSION_COLUMN].to_pylist()) == {"3"}
    assert set(table[drift.MODEL_COLUMN].to_pylist()) == {"network_security"}
    everything, read = drift.read_window(mock_s3, "lake", "predictions", partitions, network_spec, None)
    assert everything.num_rows == read == 65
    empty, read = drift.read_window(mock_s3, "lake", "predictions", ["dt=2026-01-01/00"], network_spec, champion)
    assert (empty.num_rows, read) == (0, 0)


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
    ],
)
def test_bad_configuration_names_the_file_and_the_problem(tmp_path, text, message):
    path = tmp_path / "drift.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as raised:
        drift.load_drift_config(path)
    assert str(path) in str(raised.value)
