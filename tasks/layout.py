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
import re
from dataclasses import dataclass

from tasks.config import Settings
from tasks.dataset_spec import DatasetSpec
from tasks.storage import S3Location, parse_s3_uri

# The files of a day's features folder (written by tasks.transform, read by train, evaluate, smoke test).
TRAIN_SPLIT = "train.parquet"
TEST_SPLIT = "test.parquet"
PREPROCESSOR = "preprocessor.skops"
MANIFEST = "manifest.json"
_CANONICAL_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")


def check_ds(ds: str) -> str:
    """Return ``ds`` if it is a day in the canonical form YYYY-MM-DD, else raise a clear error.

    ``date.fromisoformat`` alone also accepts ``20260131`` and ``2026-W05-2`` (Python 3.11),
    which would write partitions named ``ds=20260131`` that no later step finds.

    Raises:
        ValueError: ``ds`` is not a real day written as YYYY-MM-DD.
    """
    try:
        if not isinstance(ds, str) or not _CANONICAL_DAY.fullmatch(ds):
            raise ValueError("not YYYY-MM-DD")
        dt.date.fromisoformat(ds)
    except ValueError as err:
        raise ValueError(f"ds must be a day written YYYY-MM-DD (e.g. 2026-01-31), got {ds!r}") from err
    return ds


def features_file(features_uri: str, name: str) -> str:
    """The URI of one file (``TRAIN_SPLIT``, ``TEST_SPLIT``, ...) of a features folder given by its URI."""
    return parse_s3_uri(features_uri).child(name).uri


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

    @property
    def train_split(self) -> S3Location:
        return self.features_dir.child(TRAIN_SPLIT)

    @property
    def test_split(self) -> S3Location:
        return self.features_dir.child(TEST_SPLIT)
