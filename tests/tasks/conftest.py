"""Fixtures shared by the unit tests of ``tasks/``: specs, settings and an in-process S3."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto import mock_aws

from tasks import storage
from tasks.config import Settings
from tasks.dataset_spec import DatasetSpec, load_spec


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
def mock_s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A boto3 S3 client backed by moto's in-process mock (no network, nothing persists).

    Named apart from the integration suite's ``s3`` fixture (the private emulator) so a
    unit test can never start the stack by accident.
    """
    # An emulator endpoint or a profile from the developer's shell must not leak in:
    # moto only intercepts requests addressed to AWS.
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with mock_aws():
        yield boto3.client("s3", region_name="us-east-1")


@pytest.fixture
def buckets(mock_s3: Any, settings: Settings) -> Any:
    """The mocked S3 client with the raw and lake buckets created."""
    storage.ensure_bucket(mock_s3, settings.raw_bucket)
    storage.ensure_bucket(mock_s3, settings.lake_bucket)
    return mock_s3
