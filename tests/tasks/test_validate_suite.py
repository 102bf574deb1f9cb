"""Expectation suites: generated from the spec, committed, and failures described readably."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
import pytest

from tasks.dataset_spec import CATEGORICAL, DatasetSpec, available_datasets, load_spec
from tasks.validate import build_suite, describe_failures, load_suite_json


def by_type(suite: dict[str, Any], expectation_type: str) -> list[dict[str, Any]]:
    return [e for e in suite["expectations"] if e["type"] == expectation_type]


def label_mean_bounds(suite: dict[str, Any]) -> tuple[float, float]:
    (mean,) = by_type(suite, "expect_column_mean_to_be_between")
    return mean["kwargs"]["min_value"], mean["kwargs"]["max_value"]


@pytest.mark.parametrize("name", available_datasets())
def test_committed_suite_matches_spec(name: str) -> None:
    """Regenerate with `python -m tasks.validate build-suite` when this fails."""
    spec = load_spec(name)
    assert spec.expectation_suite_path.is_file()
    assert json.loads(spec.expectation_suite_path.read_text()) == build_suite(spec)
    assert load_suite_json(spec) == build_suite(spec)


def test_every_spec_has_a_suite_and_every_suite_a_spec() -> None:
    spec = load_spec(available_datasets()[0])
    suites = sorted(p.stem for p in spec.expectation_suite_path.parent.glob("*.json"))
    assert suites == available_datasets()


@pytest.mark.parametrize("name", available_datasets())
def test_suite_covers_table_and_label(name: str) -> None:
    spec = load_spec(name)
    suite = build_suite(spec)
    assert suite["name"] == spec.name
    (columns,) = by_type(suite, "expect_table_columns_to_match_ordered_list")
    assert columns["kwargs"]["column_list"] == spec.column_names
    (rows,) = by_type(suite, "expect_table_row_count_to_be_between")
    assert rows["kwargs"]["min_value"] == spec.min_rows
    (distinct,) = by_type(suite, "expect_column_distinct_values_to_equal_set")
    assert distinct["kwargs"] == {"column": spec.target.name, "value_set": list(spec.target.allowed_values)}
    (mean,) = by_type(suite, "expect_column_mean_to_be_between")
    assert mean["kwargs"]["column"] == spec.target.name


@pytest.mark.parametrize("name", available_datasets())
def test_suite_has_per_column_checks(name: str) -> None:
    """Every column gets a type and a null check; categoricals a set, bounded numerics a range."""
    spec = load_spec(name)
    suite = build_suite(spec)
    typed = {
        e["kwargs"]["column"]: e["kwargs"]["type_list"]
        for e in by_type(suite, "expect_column_values_to_be_in_type_list")
    }
    assert typed == {c.name: [c.dtype, c.dtype.capitalize()] if c.is_integer else [c.dtype] for c in spec.columns}
    not_null = {e["kwargs"]["column"] for e in by_type(suite, "expect_column_values_to_not_be_null")}
    assert not_null == set(spec.column_names)
    in_set = {
        e["kwargs"]["column"]: e["kwargs"]["value_set"] for e in by_type(suite, "expect_column_values_to_be_in_set")
    }
    assert in_set == {c.name: list(c.allowed_values) for c in spec.columns if c.kind == CATEGORICAL}
    between = {e["kwargs"]["column"]: e["kwargs"] for e in by_type(suite, "expect_column_values_to_be_between")}
    for column in spec.columns:
        if column.kind != CATEGORICAL and (column.min_value is not None or column.max_value is not None):
            assert (between[column.name]["min_value"], between[column.name]["max_value"]) == (
                column.min_value,
                column.max_value,
            )


def test_null_fraction_becomes_mostly(network_spec: DatasetSpec) -> None:
    suite = build_suite(dataclasses.replace(network_spec, max_null_fraction=0.05))
    mostly = {e["kwargs"].get("mostly") for e in by_type(suite, "expect_column_values_to_not_be_null")}
    assert mostly == {0.95}
    strict = build_suite(network_spec)
    assert all("mostly" not in e["kwargs"] for e in by_type(strict, "expect_column_values_to_not_be_null"))


@pytest.mark.parametrize(
    ("name", "bounds", "expected"),
    [
        # {-1, 1} label, positive -1: mean = 1 - 2 * share
        ("network_security", (0.2, 0.8), (-0.6, 0.6)),
        ("network_security", (0.1, 0.3), (0.4, 0.8)),
        ("network_security", (0.0, 1.0), (-1.0, 1.0)),
        # {0, 1} label, positive 1: mean = share
        ("intrusion_flows", (0.1, 0.9), (0.1, 0.9)),
        ("intrusion_flows", (0.25, 0.5), (0.25, 0.5)),
    ],
)
def test_label_mean_bounds_map_positive_share(
    name: str, bounds: tuple[float, float], expected: tuple[float, float]
) -> None:
    spec = dataclasses.replace(load_spec(name), positive_fraction_bounds=bounds)
    low, high = label_mean_bounds(build_suite(spec))
    assert low == pytest.approx(expected[0])
    assert high == pytest.approx(expected[1])
    assert low <= high


@pytest.mark.parametrize("name", available_datasets())
@pytest.mark.parametrize(("share", "inside"), [(0.5, True), (0.3, True), (0.04, False), (0.97, False)])
def test_label_mean_bounds_accept_exactly_the_allowed_shares(name: str, share: float, inside: bool) -> None:
    """A label column with a given positive share passes the mean check iff the share is in bounds."""
    spec = load_spec(name)
    positives = int(round(share * 1000))
    label = np.array([spec.positive_class] * positives + [spec.negative_class] * (1000 - positives))
    low, high = label_mean_bounds(build_suite(spec))
    assert bool(low <= label.mean() <= high) is inside


def test_positive_fraction_bounds_in_committed_suite(network_spec: DatasetSpec) -> None:
    assert network_spec.positive_fraction_bounds == (0.2, 0.8)
    assert label_mean_bounds(load_suite_json(network_spec)) == (-0.6, 0.6)


# --- describe_failures -----------------------------------------------------------------------

GX_RESULT: dict[str, Any] = {
    "success": False,
    "statistics": {"evaluated_expectations": 5, "successful_expectations": 1, "unsuccessful_expectations": 4},
    "expectations": [
        {
            "expectation_type": "expect_column_values_to_not_be_null",
            "success": True,
            "kwargs": {"column": "port", "batch_id": "snapshot"},
            "result": {"unexpected_count": 0, "partial_unexpected_list": []},
        },
        {
            "expectation_type": "expect_column_values_to_be_in_set",
            "success": False,
            "kwargs": {"column": "Favicon", "value_set": [-1, 0, 1], "batch_id": "snapshot"},
            "result": {"unexpected_count": 3, "partial_unexpected_list": [2, 2, 7, 9, 11, 12]},
        },
        {
            "expectation_type": "expect_column_mean_to_be_between",
            "success": False,
            "kwargs": {"column": "Result", "min_value": -0.6, "max_value": 0.6, "batch_id": "snapshot"},
            "result": {"observed_value": 0.9},
        },
        {
            "expectation_type": "expect_table_columns_to_match_ordered_list",
            "success": False,
            "kwargs": {"column_list": ["a", "b"], "batch_id": "snapshot"},
            "result": {"observed_value": ["a"]},
        },
        {
            "expectation_type": "expect_column_values_to_be_in_type_list",
            "success": False,
            "kwargs": {"column": "SFH", "type_list": ["int8", "Int8"], "batch_id": "snapshot"},
            "result": {},
            "exception_info": {
                "raised_exception": True,
                "exception_message": "Column SFH not found\nTraceback ...",
                "exception_traceback": "Traceback ...",
            },
        },
    ],
}


def test_describe_failures_one_line_per_failed_expectation() -> None:
    lines = describe_failures(GX_RESULT)
    assert len(lines) == 4
    assert all("\n" not in line for line in lines)
    assert not any("expect_column_values_to_not_be_null" in line for line in lines)


def test_describe_failures_unexpected_values() -> None:
    line = describe_failures(GX_RESULT)[0]
    assert line.startswith("expect_column_values_to_be_in_set(Favicon)")
    assert "3 unexpected value(s)" in line
    assert "[2, 2, 7, 9, 11]" in line  # sample capped at five


def test_describe_failures_observed_value() -> None:
    line = describe_failures(GX_RESULT)[1]
    assert line.startswith("expect_column_mean_to_be_between(Result)")
    assert "observed 0.9" in line
    assert "min_value=-0.6" in line and "max_value=0.6" in line
    assert "batch_id" not in line


def test_describe_failures_table_expectation_has_no_column() -> None:
    line = describe_failures(GX_RESULT)[2]
    assert line.startswith("expect_table_columns_to_match_ordered_list:")
    assert "'b'" in line  # the column the table lacks is named


def test_describe_failures_exception() -> None:
    line = describe_failures(GX_RESULT)[3]
    assert line == "expect_column_values_to_be_in_type_list(SFH): could not be evaluated (Column SFH not found)"


def test_describe_failures_of_a_passing_result_is_empty() -> None:
    passing = {"success": True, "expectations": [e for e in GX_RESULT["expectations"] if e["success"]]}
    assert describe_failures(passing) == []
    assert describe_failures({}) == []


def test_a_rejection_names_the_failed_expectations_or_the_error_and_where_the_result_is() -> None:
    from tasks.validate import rejection_reason

    reason = rejection_reason(GX_RESULT, RuntimeError("validation failed"), "s3://lake/r.json")
    assert reason.startswith("expect_column_values_to_be_in_set(Favicon)") and "; " in reason
    assert reason.endswith(" (full result: s3://lake/r.json)")
    passed = {"expectations": [{"success": True}]}
    assert rejection_reason(passed, RuntimeError("boom"), "s3://x") == "boom (full result: s3://x)"
