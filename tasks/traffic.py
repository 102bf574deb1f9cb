"""Synthetic serving traffic: generated records sent to the model server's batch endpoint.

Used by ``make run``'s closed loop and the drift and quality tests to put a known
distribution into the prediction log (normal traffic, or traffic drifted with the
generator's knob). ``send_traffic`` keeps the request ids the server answered with and the
labels the generator drew, so ``tasks.datagen.label_feedback`` and
``tasks.feedback.publish_feedback`` can deliver the delayed ground truth for exactly the
predictions that were served.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from tasks.datagen import DriftKnob, generate
from tasks.dataset_spec import DatasetSpec
from tasks.feedback import TRUE_LABEL

_METRIC = re.compile(r"^(prediction_log_\w+?)(?:_total)? ([0-9.e+]+)$", re.MULTILINE)


SERVED_COLUMNS = ("request_id", "served_at", "model_name", "model_version", "label", "probability", TRUE_LABEL)


@dataclass(frozen=True)
class ServedTraffic:
    """What the server answered for generated traffic, with the truth the generator knows.

    Attributes:
        predictions: One row per record: ``request_id`` (the id the server answered with, the
            prediction log's key), ``served_at`` (UTC, when the answer arrived), ``model_name``,
            ``model_version``, the served ``label`` and ``probability``, and ``true_label`` (the
            generated label: what delayed feedback will eventually say).
    """

    predictions: pd.DataFrame = field(repr=False)

    @property
    def rows(self) -> int:
        """How many records were predicted."""
        return len(self.predictions)

    def __str__(self) -> str:
        # Messages that printed the row count this function used to return still read right.
        return str(self.rows)


def send_traffic(
    url: str,
    api_key: str,
    spec: DatasetSpec,
    rows: int,
    *,
    seed: int,
    knob: DriftKnob | None = None,
    batch_size: int = 500,
    model: str | None = None,
) -> ServedTraffic:
    """POST ``rows`` generated records to the batch endpoint and keep what it answered.

    Args:
        url: Base URL of the model server.
        api_key: Its predict key (``X-API-Key``).
        spec: Dataset the records are generated for.
        rows: How many records.
        seed: Generator seed (the same seed sends the same records).
        knob: Drift settings of the generated records (``concept_drift`` changes only the
            true labels, so the server sees the same features).
        batch_size: Records per request.
        model: Registered model to address (``/models/{model}/predict/batch``); None for the
            server's default model (``/predict/batch``).

    Returns:
        The answers with their request ids and the true labels, for ``label_feedback``.

    Raises:
        RuntimeError: A request failed (the status and body are in the message).
    """
    import datetime as dt

    import httpx

    frame = generate(spec, rows, seed=seed, knob=knob)
    features = frame[spec.feature_names]
    records: list[dict[str, Any]] = [
        {k: v.item() if hasattr(v, "item") else v for k, v in row.items()} for row in features.to_dict(orient="records")
    ]
    path = f"/models/{model}/predict/batch" if model else "/predict/batch"
    answers: list[dict[str, Any]] = []
    served_at: list[dt.datetime] = []
    with httpx.Client(base_url=url, headers={"X-API-Key": api_key}, timeout=60) as client:
        for start in range(0, len(records), batch_size):
            response = client.post(path, json={"records": records[start : start + batch_size]})
            if response.status_code != 200:
                raise RuntimeError(f"{url}{path} answered {response.status_code}: {response.text[:300]}")
            predictions = response.json()["predictions"]
            answers.extend(predictions)
            served_at.extend([dt.datetime.now(dt.UTC)] * len(predictions))
    if len(answers) != len(records):
        raise RuntimeError(f"{url}{path} answered {len(answers)} predictions for {len(records)} records")
    served = pd.DataFrame(answers, columns=["request_id", "model_name", "model_version", "label", "probability"])
    served["served_at"] = pd.to_datetime(served_at, utc=True)
    served[TRUE_LABEL] = frame[spec.target.name].to_numpy()
    return ServedTraffic(served[list(SERVED_COLUMNS)])


def prediction_log_stats(url: str) -> dict[str, float]:
    """The prediction log's counters from the server's Prometheus ``/metrics``."""
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {name: float(value) for name, value in _METRIC.findall(text)}


def wait_until_logged(url: str, timeout: float = 60.0) -> dict[str, float]:
    """Block until every prediction the server queued has been written to S3.

    Raises:
        TimeoutError: Records are still buffered after ``timeout`` seconds (S3 down?).
    """
    deadline = time.monotonic() + timeout
    while True:
        stats = prediction_log_stats(url)
        if stats.get("prediction_log_buffered_records", 1) == 0 and stats.get("prediction_log_written", 0) >= stats.get(
            "prediction_log_enqueued", 0
        ):
            return stats
        if time.monotonic() > deadline:
            raise TimeoutError(f"prediction log of {url} still buffering after {timeout:.0f} s: {stats}")
        time.sleep(0.5)
