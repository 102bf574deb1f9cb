"""Transformation: stratified train/test split and the preprocessing fitted on train only.

Outputs under ``features/<dataset>/ds=.../``:

* ``train.parquet`` and ``test.parquet``: the split rows, raw spec columns. The served
  model is preprocessing + estimator in one pipeline, so it takes raw columns too.
* ``preprocessor.skops``: the ``ColumnTransformer`` fitted on the train split only
  (one-hot for categorical features with the spec's categories, median-impute and
  standard-scale for numeric ones). Training reuses it as the pipeline's first step.
* ``manifest.json``: row counts, class balance, seed and the snapshot it came from.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from tasks import storage
from tasks.dataset_spec import CATEGORICAL, NUMERIC, DatasetSpec
from tasks.layout import MANIFEST, PREPROCESSOR, DayLayout
from tasks.model_io import dump_skops, load_skops

log = logging.getLogger(__name__)


def build_preprocessor(spec: DatasetSpec) -> ColumnTransformer:
    """An unfitted preprocessor whose output columns depend on the spec only, not the data."""
    categorical = [c for c in spec.features if c.kind == CATEGORICAL]
    numeric = [c.name for c in spec.features if c.kind == NUMERIC]
    steps = []
    if categorical:
        encoder = OneHotEncoder(
            categories=[sorted(c.allowed_values) for c in categorical],
            handle_unknown="ignore",
            sparse_output=False,
            dtype="float32",
        )
        steps.append(("categorical", encoder, [c.name for c in categorical]))
    if numeric:
        scale = Pipeline([("impute", SimpleImputer(strategy="median")), ("scale", StandardScaler())])
        steps.append(("numeric", scale, numeric))
    return ColumnTransformer(steps, remainder="drop", verbose_feature_names_out=False)


def split(frame: pd.DataFrame, spec: DatasetSpec, test_size: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Stratified split on the label with a fixed seed; same input, same split."""
    train, test = train_test_split(frame, test_size=test_size, random_state=seed, stratify=frame[spec.target.name])
    return train.reset_index(drop=True), test.reset_index(drop=True)


def window_snapshots(client: Any, layout: DayLayout, window_days: int) -> list[dict[str, Any]]:
    """Manifests of the snapshots in the window ending at ``layout.ds`` (oldest first).

    Days without a snapshot (no drop, or a rejected one) are skipped; the run's own day
    must have one.
    """
    if window_days < 1:
        raise ValueError(f"window_days must be at least 1, got {window_days}")
    end = dt.date.fromisoformat(layout.ds)
    manifests = []
    for offset in range(window_days - 1, -1, -1):
        day = DayLayout(layout.settings, layout.spec, (end - dt.timedelta(days=offset)).isoformat())
        if storage.exists(client, day.snapshot_manifest):
            manifests.append(storage.get_json(client, day.snapshot_manifest))
        elif offset == 0:
            raise FileNotFoundError(f"no snapshot for {layout.spec.name} ds={layout.ds} at {day.snapshot.uri}")
    return manifests


def transform_day(
    client: Any,
    layout: DayLayout,
    test_size: float,
    seed: int,
    window_days: int = 1,
    feedback: tuple[pd.DataFrame, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Split the validated snapshot(s), fit the preprocessor on train and write the features.

    Args:
        client: boto3 S3 client.
        layout: The day's locations (features are written under this day).
        test_size: Held-out share.
        seed: Split seed.
        window_days: Train on the snapshots of the last N days ending at ``layout.ds``.
        feedback: Labelled served rows and their lineage (``tasks.feedback.feedback_training_frame``),
            added to the snapshots before the split, so the holdout holds the newest truth too.

    Returns:
        URIs of the features folder, the splits, the preprocessor and the manifest, the
        snapshots used with their content hashes, row counts, and ``feedback`` (its lineage) when given.
    """
    spec = layout.spec
    manifests = window_snapshots(client, layout, window_days)
    frames = [
        storage.read_parquet(client, storage.parse_s3_uri(m["snapshot_uri"]), columns=spec.column_names)
        for m in manifests
    ]
    if feedback is not None and len(feedback[0]):
        frames.append(feedback[0][spec.column_names].astype(spec.dtypes))
    frame = pd.concat(frames, ignore_index=True)
    train, test = split(frame, spec, test_size, seed)
    preprocessor = build_preprocessor(spec).fit(train[spec.feature_names])
    out = layout.features_dir
    train_uri = storage.write_parquet(client, layout.train_split, train)
    test_uri = storage.write_parquet(client, layout.test_split, test)
    preprocessor_uri = storage.put_bytes(client, out.child(PREPROCESSOR), dump_skops(preprocessor))
    target = spec.target.name
    snapshots = {
        "snapshot_uris": [m["snapshot_uri"] for m in manifests],
        "content_hashes": [m["content_sha256"] for m in manifests],
    }
    manifest = {
        "dataset": spec.name,
        "ds": layout.ds,
        "window_days": window_days,
        **snapshots,
        "seed": seed,
        "test_size": test_size,
        "train_rows": len(train),
        "test_rows": len(test),
        "train_positive_share": float((train[target] == spec.positive_class).mean()),
        "test_positive_share": float((test[target] == spec.positive_class).mean()),
        "feature_names_out": [str(n) for n in preprocessor.get_feature_names_out()],
    }
    if feedback is not None:
        manifest["feedback"] = feedback[1]
    manifest_uri = storage.put_json(client, out.child(MANIFEST), manifest)
    log.info("features %s: %d train / %d test rows from %d snapshot(s)", out.uri, len(train), len(test), len(manifests))
    return {
        "features_uri": out.uri + "/",
        "train_uri": train_uri,
        "test_uri": test_uri,
        "preprocessor_uri": preprocessor_uri,
        "manifest_uri": manifest_uri,
        "train_rows": len(train),
        "test_rows": len(test),
        "window_days": window_days,
        **snapshots,
        **({"feedback": feedback[1]} if feedback is not None else {}),
    }


def read_preprocessor(client: Any, uri: str) -> ColumnTransformer:
    return load_skops(storage.get_bytes(client, storage.parse_s3_uri(uri)))
