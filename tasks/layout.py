"""Where each artifact of a day lives in S3.

Keys derive from the dataset and the run's ``ds`` (never from the clock), so a
rerun of a day overwrites the same keys and a backfill is safe::

    s3://<raw>/<raw_prefix>/ds=YYYY-MM-DD/*.csv                 landing zone (upstream)
    s3://<lake>/snapshots/<dataset>/ds=YYYY-MM-DD/data.parquet   immutable snapshot (+ manifest.json)
    s3://<lake>/validation/<dataset>/ds=YYYY-MM-DD/              GX result (JSON) + readable report
    s3://<lake>/quarantine/<dataset>/ds=YYYY-MM-DD/              rejected raw files + reason.json
    s3://<lake>/features/<dataset>/ds=YYYY-MM-DD/                train/test splits + fitted preprocessor
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from tasks.config import Settings
from tasks.dataset_spec import DatasetSpec
from tasks.storage import S3Location


def check_ds(ds: str) -> str:
    """Return ``ds`` if it is an ISO date (YYYY-MM-DD), else raise a clear error."""
    try:
        dt.date.fromisoformat(ds)
    except (TypeError, ValueError) as err:
        raise ValueError(f"ds must be a date like 2026-01-31, got {ds!r}") from err
    return ds


@dataclass(frozen=True)
class DayLayout:
    """The S3 locations of one dataset's day."""

    settings: Settings
    spec: DatasetSpec
    ds: str

    def __post_init__(self) -> None:
        check_ds(self.ds)

    def _lake(self, area: str) -> S3Location:
        return S3Location(self.settings.lake_bucket, f"{area}/{self.spec.name}/ds={self.ds}")

    @property
    def raw_prefix(self) -> S3Location:
        return S3Location(self.settings.raw_bucket, f"{self.spec.raw_prefix}/ds={self.ds}/")

    @property
    def raw_key_pattern(self) -> str:
        """Wildcard key the S3 sensor waits for."""
        return f"{self.raw_prefix.key}*.csv"

    @property
    def snapshot_dir(self) -> S3Location:
        return self._lake("snapshots")

    @property
    def snapshot(self) -> S3Location:
        return self.snapshot_dir.child("data.parquet")

    @property
    def snapshot_manifest(self) -> S3Location:
        return self.snapshot_dir.child("manifest.json")

    @property
    def validation_dir(self) -> S3Location:
        return self._lake("validation")

    @property
    def quarantine_dir(self) -> S3Location:
        return self._lake("quarantine")

    @property
    def features_dir(self) -> S3Location:
        return self._lake("features")
