"""Dataset specs: the committed specs load as documented, malformed ones fail clearly."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from tasks.dataset_spec import (
    CATEGORICAL,
    DATASETS_DIR,
    NUMERIC,
    DatasetSpec,
    IngestLimits,
    SpecError,
    available_datasets,
    load_spec,
)

VALID: dict[str, Any] = {
    "name": "toy",
    "description": "A toy dataset.",
    "feature_defaults": {"dtype": "int8", "kind": "categorical", "allowed_values": [-1, 0, 1]},
    "features": [{"name": "a"}, {"name": "b"}, {"name": "size", "dtype": "float64", "kind": "numeric"}],
    "target": {"name": "label", "dtype": "int8", "kind": "categorical", "allowed_values": [0, 1]},
    "positive_class": 1,
    "positive_fraction_bounds": [0.1, 0.9],
}


def write_spec(tmp_path: Path, raw: Any, name: str = "toy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path


def test_network_security_spec(network_spec: DatasetSpec) -> None:
    """30 ternary int8 features and a {-1, 1} label whose positive class is -1."""
    assert network_spec.name == "network_security"
    assert len(network_spec.features) == 30
    for column in network_spec.features:
        assert (column.dtype, column.kind) == ("int8", CATEGORICAL), column.name
        assert list(column.allowed_values) == [-1, 0, 1], column.name
    target = network_spec.target
    assert (target.name, target.dtype, list(target.allowed_values)) == ("Result", "int8", [-1, 1])
    assert network_spec.positive_class == -1
    assert network_spec.negative_class == 1
    assert network_spec.column_names[-1] == "Result"
    assert network_spec.drop_duplicates is False


def test_intrusion_flows_spec(flows_spec: DatasetSpec) -> None:
    """Numeric (mostly float) features and a 0/1 label whose positive class is 1."""
    assert flows_spec.name == "intrusion_flows"
    assert all(c.kind == NUMERIC for c in flows_spec.features)
    dtypes = {c.name: c.dtype for c in flows_spec.features}
    assert dtypes.pop("distinct_ports") == "int32"
    assert set(dtypes.values()) == {"float64"}
    assert flows_spec.target.name == "is_attack"
    assert list(flows_spec.target.allowed_values) == [0, 1]
    assert (flows_spec.positive_class, flows_spec.negative_class) == (1, 0)
    assert flows_spec.drop_duplicates is True
    syn = next(c for c in flows_spec.features if c.name == "syn_ratio")
    assert (syn.min_value, syn.max_value) == (0, 1)


def test_available_datasets_lists_both_specs() -> None:
    assert {"network_security", "intrusion_flows"} <= set(available_datasets())


@pytest.mark.parametrize("name", ["network_security", "intrusion_flows"])
def test_load_by_path_equals_load_by_name(name: str) -> None:
    assert load_spec(DATASETS_DIR / f"{name}.yaml") == load_spec(name)


@pytest.mark.parametrize("name", ["network_security", "intrusion_flows"])
def test_to_dict_round_trips_columns(name: str) -> None:
    """The logged form carries every column with its dtype, in file order."""
    spec = load_spec(name)
    as_dict = spec.to_dict()
    names = [c["name"] for c in as_dict["features"]] + [as_dict["target"]["name"]]
    assert names == spec.column_names
    assert as_dict["positive_class"] == spec.positive_class


def test_valid_toy_spec_loads(tmp_path: Path) -> None:
    """Feature defaults apply and per-column keys override them."""
    spec = load_spec(write_spec(tmp_path, VALID))
    assert spec.dtypes == {"a": "int8", "b": "int8", "size": "float64", "label": "int8"}
    assert spec.features[2].kind == NUMERIC
    assert spec.raw_prefix == "toy"


def _mutate(change: str) -> dict[str, Any]:
    raw = copy.deepcopy(VALID)
    if change == "bad dtype":
        raw["features"][1]["dtype"] = "string"
    elif change == "bad kind":
        raw["features"][2]["kind"] = "text"
    elif change == "positive not allowed":
        raw["positive_class"] = 2
    elif change == "duplicated feature":
        raw["features"].append({"name": "a"})
    elif change == "feature named like target":
        raw["features"].append({"name": "label"})
    elif change == "one allowed value":
        raw["features"][0]["allowed_values"] = [1]
    elif change == "three-class target":
        raw["target"]["allowed_values"] = [0, 1, 2]
    elif change == "no features":
        raw["features"] = []
    elif change == "nameless column":
        raw["features"].append({"dtype": "int8"})
    elif change == "inverted bounds":
        raw["positive_fraction_bounds"] = [0.9, 0.1]
    return raw


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("bad dtype", "column 'b' has dtype 'string'"),
        ("bad kind", "column 'size' has kind 'text'"),
        ("positive not allowed", "positive_class 2 is not one of the target's allowed_values [0, 1]"),
        ("duplicated feature", "duplicated column names ['a']"),
        ("feature named like target", "duplicated column names ['label']"),
        ("one allowed value", "categorical column 'a' needs at least two allowed_values"),
        ("three-class target", "target 'label' must be categorical with two allowed_values"),
        ("no features", "'features' is empty"),
        ("nameless column", "every column needs a 'name'"),
        ("inverted bounds", "positive_fraction_bounds must be [low, high]"),
    ],
)
def test_malformed_spec_raises_spec_error(tmp_path: Path, change: str, expected: str) -> None:
    """The error names the file and the problem."""
    path = write_spec(tmp_path, _mutate(change))
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert expected in str(err.value)
    assert str(path) in str(err.value)


def test_unknown_dataset_lists_known_ones() -> None:
    with pytest.raises(SpecError) as err:
        load_spec("no_such_dataset")
    message = str(err.value)
    assert "no_such_dataset" in message
    for known in available_datasets():
        assert known in message


def test_missing_spec_path_raises_spec_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="not found"):
        load_spec(tmp_path / "absent.yaml")


def test_spec_error_is_a_value_error() -> None:
    assert issubclass(SpecError, ValueError)


@pytest.mark.parametrize(
    "text",
    [
        "",  # empty file: yaml.safe_load returns None, then None.get(...) -> AttributeError
        "- just\n- a list\n",  # top level list -> AttributeError
        yaml.safe_dump({**VALID, "features": ["a", "b"]}),  # bare names -> TypeError in _parse_column
    ],
    ids=["empty-file", "top-level-list", "bare-feature-names"],
)
def test_non_mapping_spec_raises_spec_error(tmp_path: Path, text: str) -> None:
    with pytest.raises(SpecError):
        load_spec(write_spec(tmp_path, text))


# --- limits -----------------------------------------------------------------------------------


def test_limits_default_when_absent(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path, VALID))
    assert spec.limits == IngestLimits()
    assert spec.to_dict()["limits"] == {
        "max_file_bytes": 256 * 2**20,
        "max_columns": 1000,
        "max_rows": 5_000_000,
        "max_table_bytes": 256 * 2**20,
    }


def test_limits_are_overridable_per_spec(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path, {**VALID, "limits": {"max_rows": 10, "max_file_bytes": 2048}}))
    assert (spec.limits.max_rows, spec.limits.max_file_bytes) == (10, 2048)
    assert spec.limits.max_columns == IngestLimits().max_columns  # the others keep their defaults


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        ({"max_row": 10}, "unknown key(s) ['max_row'] in 'limits'"),
        ({"max_rows": 0}, "limits.max_rows must be a positive integer, got 0"),
        ({"max_rows": "1e6"}, "limits.max_rows must be a positive integer, got '1e6'"),
        ({"max_columns": True}, "limits.max_columns must be a positive integer, got True"),
        ({"max_columns": 3}, "limits.max_columns = 3 is below the spec's 4 columns"),
        ([1, 2], "'limits' is a mapping"),
    ],
)
def test_malformed_limits_raise_spec_error(tmp_path: Path, limits: Any, expected: str) -> None:
    path = write_spec(tmp_path, {**VALID, "limits": limits})
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert expected in str(err.value) and str(path) in str(err.value)
