"""Deterministic synthetic data for any dataset spec, with a drift knob.

The generator has two layers of randomness:

* the *world* (how each feature relates to the label) is fixed by the dataset's
  name, so every day of a dataset comes from the same world and yesterday's model
  still applies today;
* the *sample* (which rows a day holds) comes from ``seed``.

Rows are drawn class-conditionally: the label first (prior ``positive_rate``),
then each feature from a distribution tilted by the label with a per-feature
strength (a few strong indicators, many weak ones), then ``label_noise`` flips a
share of labels. A good model therefore scores well but not perfectly.

``feature_drift`` moves the distributions of a fixed third of the features (phishers
change tactics); ``positive_rate`` moves the label prior.
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from tasks import storage
from tasks.dataset_spec import CATEGORICAL, ColumnSpec, DatasetSpec
from tasks.layout import DayLayout


@dataclass(frozen=True)
class DriftKnob:
    """How far a generated day departs from the reference world.

    Attributes:
        feature_drift: 0 for none; about 1 moves the drift-prone features' PSI well past 0.25.
        positive_rate: Share of the positive class; None keeps the world's prior.
        label_noise: Share of labels flipped at random (degrades any model).
    """

    feature_drift: float = 0.0
    positive_rate: float | None = None
    label_noise: float = 0.03


@dataclass(frozen=True)
class _FeatureWorld:
    strength: float  # how strongly the label tilts this feature
    base_logits: np.ndarray  # categorical: preference for each allowed value
    drifts: bool  # is this feature among those that drift
    drift_direction: np.ndarray  # categorical: where drift pushes the logits


def _world(spec: DatasetSpec) -> tuple[float, dict[str, _FeatureWorld]]:
    rng = np.random.default_rng(zlib.crc32(spec.name.encode()))
    prior = float(rng.uniform(0.4, 0.5))
    n = len(spec.features)
    strengths = rng.uniform(0.15, 0.7, size=n)
    strong = rng.choice(n, size=max(2, n // 5), replace=False)
    strengths[strong] = rng.uniform(1.2, 1.8, size=len(strong))
    drifting = set(rng.choice(n, size=max(1, n // 3), replace=False).tolist())
    worlds = {}
    for i, column in enumerate(spec.features):
        k = max(len(column.allowed_values), 1)
        worlds[column.name] = _FeatureWorld(
            strength=float(strengths[i]),
            base_logits=rng.normal(0.0, 0.8, size=k),
            drifts=i in drifting,
            drift_direction=rng.normal(0.0, 1.0, size=k) * 2.5,
        )
    return prior, worlds


def _categorical(
    column: ColumnSpec, world: _FeatureWorld, is_positive: np.ndarray, drift: float, rng: np.random.Generator
) -> np.ndarray:
    values = np.array(sorted(column.allowed_values))
    # Positions from -0.5 (lowest value) to +0.5: the positive class leans to the low end,
    # as phishing sites lean to -1 in the UCI encoding.
    position = np.linspace(-0.5, 0.5, len(values))
    logits = world.base_logits + (world.drift_direction * drift if world.drifts else 0.0)
    out = np.empty(len(is_positive), dtype=values.dtype)
    for label, sign in ((True, -1.0), (False, 1.0)):
        mask = is_positive == label
        class_logits = logits + sign * world.strength * 3.0 * position
        probs = np.exp(class_logits - class_logits.max())
        probs /= probs.sum()
        draws = rng.random(mask.sum())
        out[mask] = values[np.minimum(np.searchsorted(np.cumsum(probs), draws), len(values) - 1)]
    return out


def _numeric(
    column: ColumnSpec, world: _FeatureWorld, is_positive: np.ndarray, drift: float, rng: np.random.Generator
) -> np.ndarray:
    latent = rng.normal(0.0, 1.0, size=len(is_positive))
    latent += np.where(is_positive, 1.0, -1.0) * world.strength * 0.6
    if world.drifts:
        latent += drift * 1.5
    low, high = column.min_value, column.max_value
    if low is not None and high is not None:
        values = low + (high - low) / (1.0 + np.exp(-latent))
    elif low is not None:
        values = low + np.exp(latent + world.base_logits[0] * 2.0)
    else:
        values = latent * 10.0 ** world.base_logits[0]
    return np.round(values) if column.is_integer else values


def generate(spec: DatasetSpec, rows: int, seed: int, knob: DriftKnob | None = None) -> pd.DataFrame:
    """Generate ``rows`` labelled rows of ``spec``'s dataset.

    Args:
        spec: The dataset spec (columns, dtypes, allowed values, target).
        rows: Number of rows.
        seed: Sample seed; the same (spec, rows, seed, knob) always gives the same frame.
        knob: Drift and label settings; default is the undrifted world.

    Returns:
        A frame with the spec's columns in order, coerced to the spec's dtypes.
    """
    if rows < 1:
        raise ValueError(f"rows must be positive, got {rows}")
    knob = knob or DriftKnob()
    prior, worlds = _world(spec)
    rng = np.random.default_rng(seed)
    positive_rate = prior if knob.positive_rate is None else knob.positive_rate
    if not 0.0 < positive_rate < 1.0:
        raise ValueError(f"positive_rate must be within (0, 1), got {positive_rate}")
    is_positive = rng.random(rows) < positive_rate
    data = {}
    for column in spec.features:
        make = _categorical if column.kind == CATEGORICAL else _numeric
        data[column.name] = make(column, worlds[column.name], is_positive, knob.feature_drift, rng)
    flipped = rng.random(rows) < knob.label_noise
    observed_positive = is_positive ^ flipped
    data[spec.target.name] = np.where(observed_positive, spec.positive_class, spec.negative_class)
    return pd.DataFrame(data).astype(spec.dtypes)


def to_csv_parts(frame: pd.DataFrame, parts: int = 1) -> list[bytes]:
    """Split a frame into ``parts`` CSV files (header in each), as upstream drops them."""
    if parts < 1:
        raise ValueError(f"parts must be positive, got {parts}")
    bounds = np.linspace(0, len(frame), parts + 1).astype(int)
    files = []
    for start, stop in zip(bounds[:-1], bounds[1:], strict=False):
        buffer = io.StringIO()
        frame.iloc[start:stop].to_csv(buffer, index=False)
        files.append(buffer.getvalue().encode())
    return files


def day_seed(ds: str, base_seed: int = 0) -> int:
    """A stable per-day seed, so each day differs but regenerating a day is identical."""
    return zlib.crc32(f"{base_seed}:{ds}".encode())


def publish_drop(
    client: Any, layout: DayLayout, rows: int, seed: int | None = None, knob: DriftKnob | None = None, parts: int = 1
) -> list[str]:
    """Generate a day and drop it in the landing zone as ``parts`` CSV files.

    Earlier files of the same day are removed first, so republishing a day replaces it.

    Returns:
        The URIs of the CSV files written.
    """
    seed = day_seed(layout.ds) if seed is None else seed
    frame = generate(layout.spec, rows, seed, knob)
    prefix = layout.raw_prefix
    storage.ensure_bucket(client, prefix.bucket)
    storage.delete_prefix(client, prefix.bucket, prefix.key)
    return [
        storage.put_bytes(client, prefix.child(f"part-{i:04d}.csv"), body)
        for i, body in enumerate(to_csv_parts(frame, parts))
    ]


def main(argv: list[str] | None = None) -> None:
    """``python -m tasks.datagen publish --ds 2026-01-01``: drop a generated day in the raw bucket.

    The S3 endpoint comes from boto3's usual environment (``AWS_ENDPOINT_URL`` for the emulator).
    """
    import argparse

    import boto3

    from tasks.config import Settings
    from tasks.dataset_spec import load_spec

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("action", choices=["publish"])
    parser.add_argument("--ds", required=True, help="day of the drop, YYYY-MM-DD")
    parser.add_argument("--dataset", default=None, help="dataset spec name (default: settings)")
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=None, help="default: derived from ds")
    parser.add_argument("--parts", type=int, default=2, help="number of CSV files")
    parser.add_argument("--feature-drift", type=float, default=0.0)
    parser.add_argument("--positive-rate", type=float, default=None)
    parser.add_argument("--label-noise", type=float, default=DriftKnob.label_noise)
    args = parser.parse_args(argv)
    settings = Settings.load()
    spec = load_spec(args.dataset or settings.dataset)
    knob = DriftKnob(args.feature_drift, args.positive_rate, args.label_noise)
    uris = publish_drop(boto3.client("s3"), DayLayout(settings, spec, args.ds), args.rows, args.seed, knob, args.parts)
    for uri in uris:
        print(uri)


if __name__ == "__main__":
    main()
