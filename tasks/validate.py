"""Great Expectations validation of a day's snapshot, and quarantine of rejected drops.

The suite for a dataset lives in ``include/expectations/<dataset>.json``. It is
generated from the dataset spec (``python -m tasks.validate build-suite``) and a
test checks the committed file still matches the spec, so the two cannot drift.
The Airflow side runs it through ``airflow-provider-great-expectations``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
from typing import TYPE_CHECKING, Any

from tasks import storage
from tasks.dataset_spec import CATEGORICAL, DatasetSpec, available_datasets, load_spec
from tasks.layout import DayLayout

if TYPE_CHECKING:
    from great_expectations import ExpectationSuite
    from great_expectations.core.batch_definition import BatchDefinition
    from great_expectations.data_context import AbstractDataContext

log = logging.getLogger(__name__)


def _type_list(dtype: str) -> list[str]:
    # Integer columns that held nulls arrive as pandas' nullable type (Int8, ...);
    # the type check accepts both so the null expectation reports the real problem.
    return [dtype, dtype.capitalize()] if dtype.startswith("int") else [dtype]


def build_suite(spec: DatasetSpec) -> dict[str, Any]:
    """The expectation suite implied by a dataset spec, as GX 1.x suite JSON.

    Covers: columns and their order, row count, per-column type, nulls, allowed
    values or numeric bounds, both label classes present, and label balance.
    """
    expectations: list[dict[str, Any]] = [
        {"type": "expect_table_columns_to_match_ordered_list", "kwargs": {"column_list": spec.column_names}},
        {"type": "expect_table_row_count_to_be_between", "kwargs": {"min_value": spec.min_rows}},
    ]
    for column in spec.columns:
        kwargs: dict[str, Any] = {"column": column.name}
        expectations.append(
            {
                "type": "expect_column_values_to_be_in_type_list",
                "kwargs": {**kwargs, "type_list": _type_list(column.dtype)},
            }
        )
        null_kwargs = dict(kwargs)
        if spec.max_null_fraction > 0:
            null_kwargs["mostly"] = round(1.0 - spec.max_null_fraction, 6)
        expectations.append({"type": "expect_column_values_to_not_be_null", "kwargs": null_kwargs})
        if column.kind == CATEGORICAL:
            expectations.append(
                {
                    "type": "expect_column_values_to_be_in_set",
                    "kwargs": {**kwargs, "value_set": list(column.allowed_values)},
                }
            )
        elif column.min_value is not None or column.max_value is not None:
            expectations.append(
                {
                    "type": "expect_column_values_to_be_between",
                    "kwargs": {**kwargs, "min_value": column.min_value, "max_value": column.max_value},
                }
            )
    target = spec.target.name
    expectations.append(
        {
            "type": "expect_column_distinct_values_to_equal_set",
            "kwargs": {"column": target, "value_set": list(spec.target.allowed_values)},
        }
    )
    # Label balance as bounds on the label's mean: with two classes the mean is
    # negative + share_positive * (positive - negative), a linear map of the share.
    low, high = spec.positive_fraction_bounds
    span = spec.positive_class - spec.negative_class
    bounds = sorted(spec.negative_class + share * span for share in (low, high))
    expectations.append(
        {
            "type": "expect_column_mean_to_be_between",
            "kwargs": {"column": target, "min_value": round(bounds[0], 6), "max_value": round(bounds[1], 6)},
            "meta": {"notes": f"share of positive class {spec.positive_class!r} within [{low}, {high}]"},
        }
    )
    return {
        "name": spec.name,
        "expectations": expectations,
        "meta": {
            "generated_from": f"include/datasets/{spec.name}.yaml",
            "generator": "python -m tasks.validate build-suite",
        },
    }


def load_suite_json(spec: DatasetSpec) -> dict[str, Any]:
    path = spec.expectation_suite_path
    if not path.is_file():
        raise FileNotFoundError(
            f"no expectation suite for dataset {spec.name!r} at {path}; "
            f"generate it with `python -m tasks.validate build-suite {spec.name}`"
        )
    return json.loads(path.read_text())


def expectation_suite(spec: DatasetSpec) -> ExpectationSuite:
    """The committed suite for ``spec`` as a GX ``ExpectationSuite``."""
    import great_expectations as gx

    suite_json = load_suite_json(spec)
    return gx.ExpectationSuite(
        name=suite_json["name"], expectations=suite_json["expectations"], meta=suite_json.get("meta")
    )


def snapshot_batch_definition(
    gx_context: AbstractDataContext, location: storage.S3Location, boto3_options: dict[str, Any]
) -> BatchDefinition:
    """A GX batch definition reading the snapshot parquet straight from S3 (or the emulator)."""
    name = "snapshot"
    source = gx_context.data_sources.add_or_update_pandas_s3(
        name=name, bucket=location.bucket, boto3_options=boto3_options
    )
    folder, _, file_name = location.key.rpartition("/")
    asset = source.add_parquet_asset(name=name, s3_prefix=folder + "/")
    return asset.add_batch_definition_path(name=name, path=file_name)


def describe_failures(result: dict[str, Any]) -> list[str]:
    """One readable line per failed expectation of a GX result (``describe_dict`` form)."""
    lines = []
    for expectation in result.get("expectations", []):
        if expectation.get("success"):
            continue
        kwargs = expectation.get("kwargs", {})
        column = kwargs.get("column")
        what = f"{expectation.get('expectation_type')}({column})" if column else expectation.get("expectation_type")
        detail = expectation.get("result") or {}
        exception = expectation.get("exception_info") or {}
        if "column_list" in kwargs and isinstance(detail.get("observed_value"), list):
            lines.append(f"{what}: {_column_list_difference(kwargs['column_list'], detail['observed_value'])}")
        elif exception.get("raised_exception"):
            message = (
                exception.get("exception_message", "").splitlines()[0]
                if exception.get("exception_message")
                else "error"
            )
            lines.append(f"{what}: could not be evaluated ({message})")
        elif detail.get("missing_count") or detail.get("unexpected_count"):
            found = []
            if detail.get("missing_count"):
                found.append(f"missing value(s) {detail.get('partial_missing_list', [])[:5]}")
            if detail.get("unexpected_count"):
                sample = detail.get("partial_unexpected_list", [])[:5]
                found.append(f"{detail['unexpected_count']} unexpected value(s), e.g. {sample}")
            lines.append(f"{what}: {'; '.join(found)}")
        elif "observed_value" in detail:
            lines.append(f"{what}: observed {_plain(detail['observed_value'])!r}, expected {_expected(kwargs)}")
        else:
            lines.append(f"{what}: failed")
    return lines


def _plain(value: Any) -> Any:
    """numpy scalars as plain Python values, so messages read 1.0 rather than np.float64(1.0)."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, dict)) else value


def _column_list_difference(expected: list[str], observed: list[str]) -> str:
    missing = [c for c in expected if c not in observed]
    unexpected = [c for c in observed if c not in expected]
    parts = []
    if missing:
        parts.append(f"missing column(s) {missing}")
    if unexpected:
        parts.append(f"unexpected column(s) {unexpected}")
    if not parts:
        parts.append(f"columns out of order: got {observed}, expected {expected}")
    return "; ".join(parts)


def _expected(kwargs: dict[str, Any]) -> str:
    shown = {k: v for k, v in kwargs.items() if k not in ("column", "batch_id")}
    return ", ".join(f"{k}={v}" for k, v in shown.items()) or "see the suite"


def rejection_reason(result: dict[str, Any], failure: Exception, result_uri: str) -> str:
    """Why a failed validation rejects the drop: the failed expectations (else the error) and where the result is."""
    return f"{'; '.join(describe_failures(result)) or failure} (full result: {result_uri})"


def write_validation_result(client: Any, layout: DayLayout, result: dict[str, Any]) -> str:
    """Store the GX result (JSON) and a readable Markdown report; return the JSON's URI."""
    failures = describe_failures(result)
    stats = result.get("statistics", {})
    report = [
        f"# Validation of {layout.spec.name} ds={layout.ds}",
        "",
        f"- result: {'PASSED' if result.get('success') else 'FAILED'}",
        f"- snapshot: {layout.snapshot.uri}",
        f"- expectations: {stats.get('evaluated_expectations')} evaluated, "
        f"{stats.get('successful_expectations')} passed, {stats.get('unsuccessful_expectations')} failed",
        "",
    ]
    report += ["## Failures", ""] + [f"- {line}" for line in failures] if failures else ["No failures."]
    storage.put_bytes(client, layout.validation_dir.child("report.md"), "\n".join(report).encode() + b"\n")
    return storage.put_json(client, layout.validation_dir.child("result.json"), result)


def quarantine_drop(client: Any, layout: DayLayout, reason: str, stage: str, files: list[str] | None = None) -> str:
    """Copy the rejected raw files to quarantine with the reason, and withdraw the day's outputs.

    The raw files stay where they are (upstream owns the landing zone); the day's
    snapshot and features are deleted so nothing downstream mistakes them for good data.
    Each file keeps its path below the day's prefix (``a/x.csv`` and ``b/x.csv`` are two
    files in quarantine, not one); ``reason.json`` lists every raw file and its copy, in the same order.

    Args:
        client: boto3 S3 client.
        layout: The day's locations.
        reason: Why the drop was rejected (shown to operators as is).
        stage: ``ingest`` or ``validate``.
        files: Offending raw keys; all files of the day when empty or None.

    Returns:
        URI of the quarantine's ``reason.json``.
    """
    raw = layout.raw_prefix
    day_keys = storage.list_keys(client, raw.bucket, raw.key)
    offending = [k for k in (files or []) if k in day_keys] or day_keys
    target = layout.quarantine_dir
    copied = [
        storage.copy(client, storage.S3Location(raw.bucket, key), target.child(key.removeprefix(raw.key)))
        for key in offending
    ]
    withdrawn = storage.delete_prefix(client, layout.snapshot_dir.bucket, layout.snapshot_dir.key + "/")
    withdrawn += storage.delete_prefix(client, layout.features_dir.bucket, layout.features_dir.key + "/")
    note = {
        "dataset": layout.spec.name,
        "ds": layout.ds,
        "stage": stage,
        "reason": reason,
        "raw_files": [f"s3://{raw.bucket}/{k}" for k in offending],
        "quarantined_files": copied,
        "withdrawn_artifacts": withdrawn,
        "quarantined_at": dt.datetime.now(dt.UTC).isoformat(),
        "what_to_do": "fix the export upstream, drop corrected files under the same ds and rerun the day",
    }
    uri = storage.put_json(client, target.child("reason.json"), note)
    log.error("quarantined %d file(s) of %s ds=%s: %s", len(copied), layout.spec.name, layout.ds, reason)
    return uri


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate or check GX suites from dataset specs.")
    parser.add_argument("action", choices=["build-suite", "check-suite"])
    parser.add_argument("datasets", nargs="*", help="dataset names (default: all)")
    args = parser.parse_args(argv)
    stale = []
    for name in args.datasets or available_datasets():
        spec = load_spec(name)
        suite = build_suite(spec)
        if args.action == "build-suite":
            spec.expectation_suite_path.write_text(json.dumps(suite, indent=2) + "\n")
            print(f"wrote {spec.expectation_suite_path}")
        elif not spec.expectation_suite_path.is_file() or load_suite_json(spec) != suite:
            stale.append(name)
    if stale:
        raise SystemExit(f"suites out of date with their specs: {stale}; run `python -m tasks.validate build-suite`")


if __name__ == "__main__":
    main()
