"""S3 access for the pipeline: URIs, bytes, JSON and parquet, on any boto3 S3 client.

The client is passed in (from Airflow's ``S3Hook`` inside DAGs, from a plain boto3
session in scripts and tests), so the same code talks to the emulator or to AWS.
Small objects are read whole; a raw drop, which can be large, is listed with its sizes
and read by range or as a stream (see ``tasks.ingest``).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError, EndpointConnectionError

if TYPE_CHECKING:
    import pandas as pd


class StorageUnavailable(RuntimeError):
    """The S3 endpoint cannot be reached; transient, the task should be retried."""


class MissingBucket(RuntimeError):
    """A configured bucket does not exist: a setup problem, not a data problem."""


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def child(self, name: str) -> S3Location:
        return S3Location(self.bucket, f"{self.key.rstrip('/')}/{name}")


def boto3_options(credentials: Any, region_name: str | None, endpoint_url: str | None) -> dict[str, Any]:
    """Credentials (botocore's: access key, secret key, token), region and endpoint as boto3 keyword arguments.

    For clients Airflow does not build (GX's, the model server's); unset values are left out.
    """
    options = {
        "aws_access_key_id": credentials.access_key,
        "aws_secret_access_key": credentials.secret_key,
        "aws_session_token": credentials.token,
        "region_name": region_name,
        "endpoint_url": endpoint_url,
    }
    return {key: value for key, value in options.items() if value}


def parse_s3_uri(uri: str) -> S3Location:
    """Split ``s3://bucket/key`` into its parts.

    Raises:
        ValueError: The string is not an ``s3://`` URI with a bucket.
    """
    if not uri.startswith("s3://") or "/" not in uri[5:]:
        raise ValueError(f"not an s3://bucket/key URI: {uri!r}")
    bucket, _, key = uri[5:].partition("/")
    return S3Location(bucket, key)


def endpoint_of(client: Any) -> str:
    return getattr(client.meta, "endpoint_url", "the default AWS endpoint")


@contextmanager
def reachable(client: Any) -> Iterator[None]:
    """Turn connection failures into one clear error naming the endpoint."""
    try:
        yield
    except EndpointConnectionError as err:
        raise StorageUnavailable(
            f"S3 endpoint {endpoint_of(client)} is unreachable ({err}). In embedded mode start "
            "the emulator with `make stack-up`; otherwise check the `endpoint_url` extra of the "
            "AWS connection."
        ) from err
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") != "NoSuchBucket":
            raise
        bucket = err.response["Error"].get("BucketName", "")
        raise MissingBucket(
            f"bucket {bucket!r} does not exist at {endpoint_of(client)}. Buckets are infrastructure: "
            "`make stack-up` creates them in embedded mode; on AWS create them (or fix the bucket "
            "names in the network_security_config Variable)."
        ) from err


def ensure_bucket(client: Any, bucket: str) -> None:
    with reachable(client):
        try:
            client.head_bucket(Bucket=bucket)
        except ClientError:
            client.create_bucket(Bucket=bucket)


def put_bytes(
    client: Any,
    location: S3Location,
    body: bytes,
    metadata: dict[str, str] | None = None,
    content_type: str | None = None,
) -> str:
    extra = {"ContentType": content_type} if content_type else {}
    with reachable(client):
        client.put_object(Bucket=location.bucket, Key=location.key, Body=body, Metadata=metadata or {}, **extra)
    return location.uri


def get_bytes(client: Any, location: S3Location) -> bytes:
    with reachable(client):
        return client.get_object(Bucket=location.bucket, Key=location.key)["Body"].read()


def put_json(client: Any, location: S3Location, payload: Any) -> str:
    body = json.dumps(payload, indent=2, sort_keys=True, default=str).encode()
    with reachable(client):
        client.put_object(Bucket=location.bucket, Key=location.key, Body=body, ContentType="application/json")
    return location.uri


def get_json(client: Any, location: S3Location) -> Any:
    return json.loads(get_bytes(client, location))


def exists(client: Any, location: S3Location) -> bool:
    with reachable(client):
        try:
            client.head_object(Bucket=location.bucket, Key=location.key)
        except ClientError as err:
            if err.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
    return True


def list_keys(client: Any, bucket: str, prefix: str) -> list[str]:
    """All keys under ``prefix``, sorted, so reading a day's files is deterministic."""
    return [key for key, _ in list_sizes(client, bucket, prefix)]


def list_sizes(client: Any, bucket: str, prefix: str) -> list[tuple[str, int]]:
    """``(key, size in bytes)`` of every object under ``prefix``, sorted by key (sizes from the listing)."""
    objects: list[tuple[str, int]] = []
    with reachable(client):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            objects.extend((obj["Key"], int(obj["Size"])) for obj in page.get("Contents", []))
    return sorted(objects)


def get_range(client: Any, location: S3Location, start: int, length: int) -> bytes:
    """``length`` bytes from offset ``start`` (fewer at the end of the object): a ranged GET."""
    with reachable(client):
        response = client.get_object(
            Bucket=location.bucket, Key=location.key, Range=f"bytes={start}-{start + length - 1}"
        )
        return response["Body"].read()


def open_stream(client: Any, location: S3Location) -> Any:
    """The object's body as a stream (``read(n)``, ``close()``); the caller reads it in chunks."""
    with reachable(client):
        return client.get_object(Bucket=location.bucket, Key=location.key)["Body"]


def delete_prefix(client: Any, bucket: str, prefix: str) -> int:
    """Delete every key under ``prefix``; returns how many were deleted."""
    keys = list_keys(client, bucket, prefix)
    with reachable(client):
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
    return len(keys)


# One CopyObject up to this size (S3 allows 5 GiB); above it, a multipart copy in parts of
# COPY_PART_BYTES, so an oversized raw file can still be quarantined. Both run inside S3.
COPY_SINGLE_MAX_BYTES = 4 * 1024**3
COPY_PART_BYTES = 1024**3


def copy(client: Any, source: S3Location, target: S3Location) -> str:
    """Server-side copy of any size (the bytes never pass through this process)."""
    from boto3.s3.transfer import TransferConfig

    config = TransferConfig(multipart_threshold=COPY_SINGLE_MAX_BYTES, multipart_chunksize=COPY_PART_BYTES)
    with reachable(client):
        client.copy({"Bucket": source.bucket, "Key": source.key}, target.bucket, target.key, Config=config)
    return target.uri


def write_parquet(
    client: Any, location: S3Location, frame: pd.DataFrame, metadata: dict[str, str] | None = None
) -> str:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False, engine="pyarrow", compression="zstd")
    return put_bytes(client, location, buffer.getvalue(), metadata)


def read_parquet(client: Any, location: S3Location, columns: list[str] | None = None) -> pd.DataFrame:
    import pandas as pd

    return pd.read_parquet(io.BytesIO(get_bytes(client, location)), columns=columns, engine="pyarrow")


def browser_url(client: Any, uri: str, endpoint_url: str | None, region: str | None) -> str:
    """Where a person opens an ``s3://`` object.

    On AWS, the S3 console page of the object (the viewer signs in). On an emulator, which
    has no console and refuses anonymous reads, a presigned GET URL valid for 7 days.
    """
    from urllib.parse import quote

    location = parse_s3_uri(uri)
    if endpoint_url:
        return client.generate_presigned_url(
            "get_object", Params={"Bucket": location.bucket, "Key": location.key}, ExpiresIn=7 * 24 * 3600
        )
    region = region or "us-east-1"
    return (
        f"https://{region}.console.aws.amazon.com/s3/object/{location.bucket}"
        f"?region={region}&prefix={quote(location.key, safe='')}"
    )


def mlflow_run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The MLflow UI page of a run (the tracking server serves the UI)."""
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def mlflow_artifact_url(tracking_uri: str, run_id: str, path: str) -> str:
    """An artifact of a run served as-is by the tracking server (an HTML report opens in the browser)."""
    from urllib.parse import quote

    return f"{tracking_uri.rstrip('/')}/get-artifact?path={quote(path, safe='')}&run_uuid={run_id}"
