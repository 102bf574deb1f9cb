"""Synthetic serving traffic: labelled-style records sent to the model server's batch endpoint.

Used by ``make run``'s closed loop and the drift tests to put a known distribution into
the prediction log (normal traffic, or traffic drifted with the generator's knob).
"""

from __future__ import annotations

import re
import time
from typing import Any

from tasks.datagen import DriftKnob, generate
from tasks.dataset_spec import DatasetSpec

_METRIC = re.compile(r"^(prediction_log_\w+?)(?:_total)? ([0-9.e+]+)$", re.MULTILINE)


def send_traffic(
    url: str,
    api_key: str,
    spec: DatasetSpec,
    rows: int,
    *,
    seed: int,
    knob: DriftKnob | None = None,
    batch_size: int = 500,
) -> int:
    """POST ``rows`` generated records to ``/predict/batch``; returns how many were predicted.

    Raises:
        RuntimeError: A request failed (the status and body are in the message).
    """
    import httpx

    features = generate(spec, rows, seed=seed, knob=knob)[spec.feature_names]
    records: list[dict[str, Any]] = [
        {k: v.item() if hasattr(v, "item") else v for k, v in row.items()} for row in features.to_dict(orient="records")
    ]
    sent = 0
    with httpx.Client(base_url=url, headers={"X-API-Key": api_key}, timeout=60) as client:
        for start in range(0, len(records), batch_size):
            response = client.post("/predict/batch", json={"records": records[start : start + batch_size]})
            if response.status_code != 200:
                raise RuntimeError(f"{url}/predict/batch answered {response.status_code}: {response.text[:300]}")
            sent += len(response.json()["predictions"])
    return sent


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
