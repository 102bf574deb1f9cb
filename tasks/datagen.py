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

``concept_drift`` changes what the features *mean* and nothing else: the features are
drawn exactly as without it (same rows, same distribution, so PSI on the features and
on any model's scores stays at sampling noise), then the label is redrawn from the
world's posterior P(label | features) with the evidence of the strong indicators scaled
by ``1 - 2 * concept_drift``: untouched at 0, silenced at 0.5, reversed at 1 (phishing
pages now look legitimate on those indicators and the other way round). A model trained
before the drift gets worse; one trained on labels after it learns the new relationship.
How far a given value moves a model depends on how redundant the dataset's indicators
are: on the default dataset 0.7 takes a champion's ROC AUC from about 0.97 to about
0.81 (a retrained model gets back to about 0.95); on ``intrusion_flows`` 0.3 already
costs about 0.07.
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
        concept_drift: 0 for none, 1 for the strong indicators' evidence fully reversed;
            changes P(label | features) only, never the features.
    """

    feature_drift: float = 0.0
    positive_rate: float | None = None
    label_noise: float = 0.03
    concept_drift: float = 0.0


@dataclass(frozen=True)
class _FeatureWorld:
    strength: float  # how strongly the label tilts this feature
    base_logits: np.ndarray  # categorical: preference for each allowed value
    drifts: bool  # is this feature among those that drift
    drift_direction: np.ndarray  # categorical: where drift pushes the logits
    concept_flips: bool = False  # does concept drift turn this feature's evidence around


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
            # Concept drift turns the strong indicators around: the weak ones alone carry the
            # label nearly as well (they are redundant), so turning fewer changes almost nothing.
            concept_flips=i in strong,
        )
    return prior, worlds


def _categorical(
    column: ColumnSpec, world: _FeatureWorld, is_positive: np.ndarray, drift: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Values drawn given the label, and each value's log-likelihood ratio (positive vs negative)."""
    values = np.array(sorted(column.allowed_values))
    # Positions from -0.5 (lowest value) to +0.5: the positive class leans to the low end,
    # as phishing sites lean to -1 in the UCI encoding.
    position = np.linspace(-0.5, 0.5, len(values))
    logits = world.base_logits + (world.drift_direction * drift if world.drifts else 0.0)
    out = np.empty(len(is_positive), dtype=values.dtype)
    class_probs = {}
    for label, sign in ((True, -1.0), (False, 1.0)):
        mask = is_positive == label
        class_logits = logits + sign * world.strength * 3.0 * position
        probs = np.exp(class_logits - class_logits.max())
        probs /= probs.sum()
        class_probs[label] = probs
        draws = rng.random(mask.sum())
        out[mask] = values[np.minimum(np.searchsorted(np.cumsum(probs), draws), len(values) - 1)]
    value_llr = np.log(class_probs[True]) - np.log(class_probs[False])
    return out, value_llr[np.searchsorted(values, out)]


def _numeric(
    column: ColumnSpec, world: _FeatureWorld, is_positive: np.ndarray, drift: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Values drawn given the label, and each row's log-likelihood ratio (positive vs negative)."""
    latent = rng.normal(0.0, 1.0, size=len(is_positive))
    shift = world.strength * 0.6
    latent += np.where(is_positive, 1.0, -1.0) * shift
    offset = drift * 1.5 if world.drifts else 0.0
    latent += offset
    low, high = column.min_value, column.max_value
    if low is not None and high is not None:
        values = low + (high - low) / (1.0 + np.exp(-latent))
    elif low is not None:
        values = low + np.exp(latent + world.base_logits[0] * 2.0)
    else:
        values = latent * 10.0 ** world.base_logits[0]
    # log N(l; offset + shift, 1) - log N(l; offset - shift, 1), on the latent before rounding.
    llr = 2.0 * shift * (latent - offset)
    return (np.round(values) if column.is_integer else values), llr


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
    if not 0.0 <= knob.concept_drift <= 1.0:
        raise ValueError(f"concept_drift must be within [0, 1], got {knob.concept_drift}")
    is_positive = rng.random(rows) < positive_rate
    data = {}
    # Log posterior odds of the positive class given the features, with the concept-drifting
    # indicators' evidence scaled by (1 - 2 * concept_drift): 1 today, -1 fully reversed.
    log_odds = np.full(rows, np.log(positive_rate / (1.0 - positive_rate)))
    for column in spec.features:
        make = _categorical if column.kind == CATEGORICAL else _numeric
        world = worlds[column.name]
        data[column.name], llr = make(column, world, is_positive, knob.feature_drift, rng)
        log_odds += llr * (1.0 - 2.0 * knob.concept_drift if world.concept_flips else 1.0)
    if knob.concept_drift > 0:
        # The features stay as drawn; only the label is redrawn from the drifted posterior.
        is_positive = rng.random(rows) < 1.0 / (1.0 + np.exp(-log_odds))
    flipped = rng.random(rows) < knob.label_noise
    observed_positive = is_positive ^ flipped
    data[spec.target.name] = np.where(observed_positive, spec.positive_class, spec.negative_class)
    return pd.DataFrame(data).astype(spec.dtypes)


@dataclass(frozen=True)
class FeedbackKnob:
    """How delayed ground truth arrives for served predictions.

    Attributes:
        labelled_share: Share of the served predictions that ever get a label (analysts
            review a sample).
        delay_hours: Mean time from a prediction to its label.
        delay_spread: Delays are uniform within ``delay_hours * [1 - spread, 1 + spread]``.
        relabel_share: Share of the labelled predictions labelled twice: a first verdict that
            is wrong, corrected later by the right one (the latest ``labelled_at`` wins).
    """

    labelled_share: float = 0.5
    delay_hours: float = 24.0
    delay_spread: float = 0.5
    relabel_share: float = 0.0

    def __post_init__(self) -> None:
        for name in ("labelled_share", "delay_spread", "relabel_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {getattr(self, name)}")
        if self.delay_hours < 0:
            raise ValueError(f"delay_hours must be 0 or more, got {self.delay_hours}")


def label_feedback(
    served: pd.DataFrame, spec: DatasetSpec, knob: FeedbackKnob | None = None, seed: int = 0
) -> pd.DataFrame:
    """The feedback rows an upstream labelling process would deliver for served predictions.

    Args:
        served: One row per served prediction with ``request_id``, ``served_at`` (UTC) and
            ``true_label`` (``tasks.traffic.ServedTraffic.predictions`` has them).
        spec: The dataset; its ``feedback`` section names the output columns.
        knob: Share labelled, delay, relabelling; default ``FeedbackKnob()``.
        seed: Which predictions get labelled and their delays (same seed, same feedback).

    Returns:
        The spec's feedback columns (request id, true label, ``labelled_at`` in UTC), oldest
        label first; relabelled requests appear twice.

    Raises:
        ValueError: The spec declares no feedback, or ``served`` lacks a column.
    """
    from tasks.feedback import TRUE_LABEL, feedback_spec

    shape = feedback_spec(spec)
    knob = knob or FeedbackKnob()
    missing = sorted({"request_id", "served_at", TRUE_LABEL} - set(served.columns))
    if missing:
        raise ValueError(f"served predictions lack column(s) {missing}")
    rng = np.random.default_rng(seed)
    chosen = served[rng.random(len(served)) < knob.labelled_share]
    spread = rng.uniform(1.0 - knob.delay_spread, 1.0 + knob.delay_spread, len(chosen))
    served_at = pd.to_datetime(chosen["served_at"], utc=True)
    labelled_at = served_at + pd.to_timedelta(knob.delay_hours * spread, unit="h")
    truth = chosen[TRUE_LABEL].to_numpy()
    frames = [pd.DataFrame({"request_id": chosen["request_id"].to_numpy(), "label": truth, "at": labelled_at})]
    relabelled = rng.random(len(chosen)) < knob.relabel_share
    if relabelled.any():
        # The first verdict is the wrong class, given part of the way to the final one.
        wrong = np.where(truth[relabelled] == spec.positive_class, spec.negative_class, spec.positive_class)
        early = served_at[relabelled] + (labelled_at[relabelled] - served_at[relabelled]) * rng.uniform(
            0.2, 0.8, int(relabelled.sum())
        )
        frames.insert(
            0, pd.DataFrame({"request_id": chosen["request_id"].to_numpy()[relabelled], "label": wrong, "at": early})
        )
    feedback = pd.concat(frames, ignore_index=True).sort_values("at", kind="stable", ignore_index=True)
    feedback["label"] = feedback["label"].astype(spec.target.dtype)
    return feedback.rename(
        columns={
            "request_id": shape.request_id_column,
            "label": shape.label_column,
            "at": shape.labelled_at_column,
        }
    )


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
    parser.add_argument("--concept-drift", type=float, default=0.0, help="0..1: P(label | features) changes")
    args = parser.parse_args(argv)
    settings = Settings.load()
    spec = load_spec(args.dataset or settings.dataset)
    knob = DriftKnob(args.feature_drift, args.positive_rate, args.label_noise, args.concept_drift)
    uris = publish_drop(boto3.client("s3"), DayLayout(settings, spec, args.ds), args.rows, args.seed, knob, args.parts)
    for uri in uris:
        print(uri)


if __name__ == "__main__":
    main()
