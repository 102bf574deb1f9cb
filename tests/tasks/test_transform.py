"""Transformation: a stratified, deterministic split and a preprocessor fitted on train only."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest

from tasks import storage
from tasks.config import Settings
from tasks.datagen import DriftKnob, generate
from tasks.dataset_spec import DatasetSpec, load_spec
from tasks.ingest import content_hash
from tasks.layout import DayLayout
from tasks.model_io import dump_skops, load_skops
from tasks.transform import build_preprocessor, read_preprocessor, split, transform_day

DS = "2026-01-05"
DATASETS = ["network_security", "intrusion_flows"]


@pytest.fixture(scope="module", params=DATASETS)
def spec(request: pytest.FixtureRequest) -> DatasetSpec:
    return load_spec(request.param)


def with_row_id(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame plus a unique ``row_id``: split only looks at the label, so ids track rows."""
    return frame.assign(row_id=np.arange(len(frame)))


def positive_share(frame: pd.DataFrame, spec: DatasetSpec) -> float:
    return float((frame[spec.target.name] == spec.positive_class).mean())


def test_split_is_stratified(spec: DatasetSpec) -> None:
    frame = generate(spec, 2000, seed=5)
    train, test = split(frame, spec, test_size=0.2, seed=42)
    assert (len(train), len(test)) == (1600, 400)
    full = positive_share(frame, spec)
    assert abs(positive_share(train, spec) - full) <= 0.01
    assert abs(positive_share(test, spec) - full) <= 0.01


def test_split_is_stratified_on_a_skewed_label(network_spec: DatasetSpec) -> None:
    """Stratification holds for a rare positive class (10 %) too."""
    frame = generate(network_spec, 1000, seed=5, knob=DriftKnob(positive_rate=0.1, label_noise=0.0))
    _, test = split(frame, network_spec, test_size=0.2, seed=3)
    assert abs(positive_share(test, network_spec) - positive_share(frame, network_spec)) <= 0.01


def test_split_is_deterministic_for_a_seed(spec: DatasetSpec) -> None:
    frame = with_row_id(generate(spec, 500, seed=5))
    first = split(frame, spec, test_size=0.2, seed=42)
    second = split(frame, spec, test_size=0.2, seed=42)
    pd.testing.assert_frame_equal(first[0], second[0])
    pd.testing.assert_frame_equal(first[1], second[1])
    other = split(frame, spec, test_size=0.2, seed=43)
    assert set(other[1]["row_id"]) != set(first[1]["row_id"])


def test_train_and_test_are_disjoint_and_cover_all_rows(spec: DatasetSpec) -> None:
    frame = with_row_id(generate(spec, 500, seed=5))
    train, test = split(frame, spec, test_size=0.25, seed=1)
    train_ids, test_ids = set(train["row_id"]), set(test["row_id"])
    assert not train_ids & test_ids
    assert train_ids | test_ids == set(frame["row_id"])
    assert len(train) + len(test) == len(frame)
    # Rows move whole: every split row equals the original row with that id.
    rebuilt = pd.concat([train, test]).sort_values("row_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(rebuilt, frame)


def test_one_hot_categories_come_from_the_spec(network_spec: DatasetSpec) -> None:
    """Categories are the spec's allowed values even when the data shows only one value."""
    features = generate(network_spec, 50, seed=1)[network_spec.feature_names]
    constant = features.copy()
    constant[:] = 1
    encoder = build_preprocessor(network_spec).fit(constant).named_transformers_["categorical"]
    for column, categories in zip(network_spec.features, encoder.categories_, strict=True):
        assert list(categories) == sorted(column.allowed_values), column.name
    fitted = build_preprocessor(network_spec).fit(constant)
    assert fitted.transform(features).shape == (50, 3 * len(network_spec.features))
    # A -1 never seen in fitting still lands in its own column.
    out = fitted.transform(features.iloc[:1].assign(having_IP_Address=-1))
    names = list(fitted.get_feature_names_out())
    assert out[0, names.index("having_IP_Address_-1")] == 1.0


def test_preprocessor_output_does_not_depend_on_data(network_spec: DatasetSpec) -> None:
    a = build_preprocessor(network_spec).fit(generate(network_spec, 100, seed=1)[network_spec.feature_names])
    b = build_preprocessor(network_spec).fit(generate(network_spec, 30, seed=2)[network_spec.feature_names])
    assert list(a.get_feature_names_out()) == list(b.get_feature_names_out())


def _store_snapshot(client: Any, layout: DayLayout, frame: pd.DataFrame) -> None:
    """What ingest leaves for a day: the parquet and its manifest."""
    storage.write_parquet(client, layout.snapshot, frame)
    storage.put_json(
        client, layout.snapshot_manifest, {"snapshot_uri": layout.snapshot.uri, "content_sha256": content_hash(frame)}
    )


@pytest.fixture
def snapshot_layout(buckets: Any, settings: Settings, spec: DatasetSpec) -> tuple[DayLayout, pd.DataFrame]:
    """A day whose validated snapshot is already in the lake."""
    layout = DayLayout(settings, spec, DS)
    frame = generate(spec, 800, seed=21)
    _store_snapshot(buckets, layout, frame)
    return layout, frame


def test_transform_day_writes_features(buckets: Any, snapshot_layout: tuple[DayLayout, pd.DataFrame]) -> None:
    layout, frame = snapshot_layout
    spec = layout.spec
    result = transform_day(buckets, layout, test_size=0.2, seed=42)

    out = layout.features_dir
    keys = storage.list_keys(buckets, out.bucket, out.key + "/")
    names = sorted(k.rsplit("/", 1)[-1] for k in keys)
    assert names == ["manifest.json", "preprocessor.skops", "test.parquet", "train.parquet"]
    assert (result["train_rows"], result["test_rows"]) == (640, 160)

    train = storage.read_parquet(buckets, storage.parse_s3_uri(result["train_uri"]))
    test = storage.read_parquet(buckets, storage.parse_s3_uri(result["test_uri"]))
    assert train.dtypes.astype(str).to_dict() == spec.dtypes
    assert (len(train), len(test)) == (640, 160)
    expected_train, expected_test = split(frame, spec, 0.2, 42)
    pd.testing.assert_frame_equal(train, expected_train)
    pd.testing.assert_frame_equal(test, expected_test)

    manifest = storage.get_json(buckets, out.child("manifest.json"))
    assert manifest["snapshot_uris"] == [layout.snapshot.uri]
    assert (manifest["seed"], manifest["train_rows"], manifest["test_rows"]) == (42, 640, 160)
    assert manifest["train_positive_share"] == pytest.approx(positive_share(train, spec))
    preprocessor = read_preprocessor(buckets, result["preprocessor_uri"])
    assert manifest["feature_names_out"] == [str(n) for n in preprocessor.get_feature_names_out()]


def test_no_leakage_scaler_fitted_on_train_only(buckets: Any, settings: Settings, flows_spec: DatasetSpec) -> None:
    """The stored preprocessor's scaling statistics are the train split's, not the full snapshot's."""
    layout = DayLayout(settings, flows_spec, DS)
    frame = generate(flows_spec, 800, seed=21)
    _store_snapshot(buckets, layout, frame)
    result = transform_day(buckets, layout, test_size=0.25, seed=7)

    preprocessor = read_preprocessor(buckets, result["preprocessor_uri"])
    numeric = preprocessor.named_transformers_["numeric"]
    scaler = numeric.named_steps["scale"]
    train = storage.read_parquet(buckets, storage.parse_s3_uri(result["train_uri"]))
    features = flows_spec.feature_names

    assert np.allclose(scaler.mean_, train[features].mean().to_numpy())
    assert np.allclose(scaler.scale_, train[features].std(ddof=0).to_numpy())
    assert np.allclose(numeric.named_steps["impute"].statistics_, train[features].median().to_numpy())
    assert not np.allclose(scaler.mean_, frame[features].mean().to_numpy())


def test_skops_round_trip(spec: DatasetSpec) -> None:
    features = generate(spec, 300, seed=2)[spec.feature_names]
    fitted = build_preprocessor(spec).fit(features)
    loaded = load_skops(dump_skops(fitted))
    assert type(loaded) is type(fitted)
    assert np.array_equal(loaded.transform(features), fitted.transform(features))
    assert list(loaded.get_feature_names_out()) == list(fitted.get_feature_names_out())


def test_read_preprocessor_round_trips_the_stored_artifact(
    buckets: Any, snapshot_layout: tuple[DayLayout, pd.DataFrame]
) -> None:
    layout, frame = snapshot_layout
    result = transform_day(buckets, layout, test_size=0.2, seed=42)
    train, _ = split(frame, layout.spec, 0.2, 42)
    expected = build_preprocessor(layout.spec).fit(train[layout.spec.feature_names])
    loaded = read_preprocessor(buckets, result["preprocessor_uri"])
    sample = frame[layout.spec.feature_names]
    assert np.allclose(loaded.transform(sample), expected.transform(sample))


class _Custom:
    def __init__(self) -> None:
        self.payload = 1


def test_load_skops_refuses_unexpected_types() -> None:
    with pytest.raises(ValueError, match="outside SKOPS_TRUSTED_TYPES"):
        load_skops(dump_skops({"object": _Custom()}))


def test_window_concatenates_the_days_that_have_snapshots(
    buckets: Any, settings: Settings, network_spec: DatasetSpec
) -> None:
    """window_days=3 trains on the days present in the window; a missing middle day is skipped."""
    first = DayLayout(settings, network_spec, "2026-02-01")
    last = DayLayout(settings, network_spec, "2026-02-03")
    _store_snapshot(buckets, first, generate(network_spec, 300, seed=1))
    _store_snapshot(buckets, last, generate(network_spec, 500, seed=2))

    result = transform_day(buckets, last, test_size=0.2, seed=42, window_days=3)

    assert result["train_rows"] + result["test_rows"] == 800
    assert result["snapshot_uris"] == [first.snapshot.uri, last.snapshot.uri]
    with pytest.raises(FileNotFoundError, match="ds=2026-02-04"):
        transform_day(buckets, DayLayout(settings, network_spec, "2026-02-04"), 0.2, 42, window_days=2)
