"""The S3 helpers of tasks/storage.py that need no bucket."""

from __future__ import annotations

from tasks import storage


def test_boto3_options_leave_out_what_is_not_set():
    from types import SimpleNamespace

    credentials = SimpleNamespace(access_key="id", secret_key="secret", token=None)
    assert storage.boto3_options(credentials, "eu-west-1", None) == {
        "aws_access_key_id": "id", "aws_secret_access_key": "secret", "region_name": "eu-west-1",
    }  # fmt: skip
