"""Fixtures shared by the unit tests of ``tasks/``: specs, settings, an in-process S3, a SQLite store."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws

from tasks import storage
from tasks.config import Settings
from tasks.dataset_spec import DatasetSpec, load_spec
from tasks.monitoring_store import SQL_DIR


@pytest.fixture(scope="session")
def network_spec() -> DatasetSpec:
    return load_spec("network_security")


@pytest.fixture(scope="session")
def flows_spec() -> DatasetSpec:
    return load_spec("intrusion_flows")


@pytest.fixture
def settings() -> Settings:
    return Settings()


@pytest.fixture
def mock_s3(aws_isolation: None) -> Iterator[Any]:
    """A boto3 S3 client backed by moto's in-process mock (no network, nothing persists).

    Named apart from the integration suite's ``s3`` fixture (the private emulator) so a
    unit test can never start the stack by accident.
    """
    with mock_aws():
        yield boto3.client("s3", region_name="us-east-1")


@pytest.fixture
def buckets(mock_s3: Any, settings: Settings) -> Any:
    """The mocked S3 client with the raw and lake buckets created."""
    storage.ensure_bucket(mock_s3, settings.raw_bucket)
    storage.ensure_bucket(mock_s3, settings.lake_bucket)
    return mock_s3


class SqliteStore:
    """``tasks.monitoring_store.Store`` on a SQLite file with the shipped DDL.

    The same two calls the DAGs' store answers (``insert_rows`` with ``replace``, and a query
    whose named parameters SQLAlchemy binds, as ``monitoring_store.HookStore`` does), so the store's
    SQL runs for real in unit tests.
    """

    def __init__(self, path: Path) -> None:
        import sqlalchemy

        self.connection = sqlite3.connect(path)
        self.connection.row_factory = sqlite3.Row
        self.connection.executescript((SQL_DIR / "monitoring_store.sql").read_text())
        self.engine = sqlalchemy.create_engine(f"sqlite:///{path}")

    def insert_rows(
        self,
        table: str,
        rows: Iterable[tuple[Any, ...]],
        target_fields: Sequence[str] | None = None,
        *,
        replace: bool = False,
        replace_index: Sequence[str] | None = None,
    ) -> None:
        verb = "INSERT OR REPLACE" if replace else "INSERT"
        rows = list(rows)
        columns = f" ({', '.join(target_fields)})" if target_fields else ""
        placeholders = ", ".join("?" * len(rows[0]))
        with self.connection:
            self.connection.executemany(f"{verb} INTO {table}{columns} VALUES ({placeholders})", rows)

    def query(self, sql: str, parameters: Mapping[str, Any]) -> list[dict[str, Any]]:
        import sqlalchemy

        with self.engine.connect() as db:
            return [dict(row._mapping) for row in db.execute(sqlalchemy.text(sql), dict(parameters))]

    def table(self, name: str) -> list[dict[str, Any]]:
        return [dict(row) for row in self.connection.execute(f"SELECT * FROM {name}")]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    """A fresh monitoring store (SQLite file, the shipped DDL)."""
    sqlite_store = SqliteStore(tmp_path / "monitoring.db")
    try:
        yield sqlite_store
    finally:
        sqlite_store.connection.close()
        sqlite_store.engine.dispose()
