"""Dataset specification: the single description of a tabular binary-classification dataset.

Every data step (generation, ingestion, validation, transformation) is driven by a
`DatasetSpec`, so onboarding a new dataset means adding a spec file under
`include/datasets/` and its expectation suite under `include/expectations/`, not code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DATASETS_DIR = PROJECT_ROOT / "include" / "datasets"
EXPECTATIONS_DIR = PROJECT_ROOT / "include" / "expectations"

CATEGORICAL = "categorical"
NUMERIC = "numeric"
_INTEGER_DTYPES = {"int8", "int16", "int32", "int64"}
_FLOAT_DTYPES = {"float32", "float64"}


class SpecError(ValueError):
    """A dataset spec file is malformed; the message names the file and the field."""


MiB = 1024 * 1024


@dataclass(frozen=True)
class IngestLimits:
    """How large a day's drop may be before ingestion rejects it (spec key ``limits``).

    Ingestion checks each limit before it holds the data it bounds, so a drop over a
    limit is rejected (and quarantined) instead of exhausting the worker's memory. The
    defaults keep a drop at every limit under about 1 GB of worker memory with the
    committed specs; raise them per spec for a bigger worker.

    Attributes:
        max_file_bytes: Size of one raw file, from the S3 listing, checked before any read.
        max_columns: Columns in a raw file's header, read from its first bytes.
        max_rows: Data rows of the whole day (all files), counted while streaming.
        max_table_bytes: Memory of the day's typed table (spec columns at their dtype,
            other columns as text), counted while streaming. It bounds what the other
            limits cannot: many files at ``max_file_bytes``, or wide rows of text.
    """

    max_file_bytes: int = 256 * MiB
    max_columns: int = 1_000
    max_rows: int = 5_000_000
    max_table_bytes: int = 256 * MiB

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class ColumnSpec:
    """One column of the dataset.

    Attributes:
        name: Column name as it appears in the raw CSV header.
        dtype: pandas dtype the column is coerced to (int8..int64, float32, float64).
        kind: ``categorical`` (a closed set of allowed values) or ``numeric``.
        allowed_values: Closed set of values for categorical columns.
        min_value: Inclusive lower bound for numeric columns (optional).
        max_value: Inclusive upper bound for numeric columns (optional).
    """

    name: str
    dtype: str
    kind: str
    allowed_values: tuple[float | int, ...] = ()
    min_value: float | None = None
    max_value: float | None = None

    @property
    def is_integer(self) -> bool:
        return self.dtype in _INTEGER_DTYPES


@dataclass(frozen=True)
class FeedbackSpec:
    """The delayed ground truth of a dataset: one drop of labels per day, joined to predictions by request id.

    Files land at ``s3://<raw>/<prefix>/ds=YYYY-MM-DD/*.csv`` (``ds`` = the day the labels
    arrived); each row says which served prediction it labels, its true label and when it
    was labelled.

    Attributes:
        prefix: Key prefix of the feedback drops in the raw bucket.
        label_column: Column holding the true label (one of the target's allowed values);
            the target's name unless the spec says otherwise.
        request_id_column: Column holding the request id the server answered with.
        labelled_at_column: Column holding when the label was given (ISO 8601; UTC when no offset).
    """

    prefix: str
    label_column: str
    request_id_column: str = "request_id"
    labelled_at_column: str = "labelled_at"

    @property
    def column_names(self) -> list[str]:
        return [self.request_id_column, self.label_column, self.labelled_at_column]


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset: its features, its label and the bounds its daily drops must respect.

    Attributes:
        name: Dataset id, used in file names and S3 keys.
        description: One paragraph for humans (README, model card).
        features: Feature columns in the order the raw files carry them.
        target: The label column.
        positive_class: Label value of the class the model detects (e.g. phishing).
        min_rows: Smallest acceptable day.
        max_null_fraction: Largest acceptable share of nulls in any column.
        positive_fraction_bounds: Inclusive bounds on the share of the positive class.
        drop_duplicates: Drop exact duplicate rows at ingestion. Off by default:
            low-cardinality features repeat legitimately.
        raw_prefix: Key prefix of the landing zone in the raw bucket.
        limits: Size limits of a drop (see ``IngestLimits``).
        feedback: Where and in which shape its delayed labels arrive (``feedback:`` in the
            spec file); None when the dataset receives no feedback.
    """

    name: str
    description: str
    features: tuple[ColumnSpec, ...]
    target: ColumnSpec
    positive_class: int | float
    min_rows: int = 100
    max_null_fraction: float = 0.0
    positive_fraction_bounds: tuple[float, float] = (0.05, 0.95)
    drop_duplicates: bool = False
    raw_prefix: str = ""
    limits: IngestLimits = field(default_factory=IngestLimits)
    source_file: Path | None = field(default=None, compare=False)
    feedback: FeedbackSpec | None = None

    @property
    def columns(self) -> list[ColumnSpec]:
        """All columns, features first and the target last (the raw file order)."""
        return [*self.features, self.target]

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def feature_names(self) -> list[str]:
        return [c.name for c in self.features]

    @property
    def negative_class(self) -> int | float:
        (negative,) = [v for v in self.target.allowed_values if v != self.positive_class]
        return negative

    @property
    def dtypes(self) -> dict[str, str]:
        return {c.name: c.dtype for c in self.columns}

    @property
    def expectation_suite_path(self) -> Path:
        return EXPECTATIONS_DIR / f"{self.name}.json"

    def to_dict(self) -> dict:
        """A JSON-serialisable form, logged with every model trained on this dataset."""
        return {
            "name": self.name,
            "features": [_column_to_dict(c) for c in self.features],
            "target": _column_to_dict(self.target),
            "positive_class": self.positive_class,
            "min_rows": self.min_rows,
            "max_null_fraction": self.max_null_fraction,
            "positive_fraction_bounds": list(self.positive_fraction_bounds),
            "drop_duplicates": self.drop_duplicates,
            "raw_prefix": self.raw_prefix,
            "limits": self.limits.to_dict(),
        }


def _column_to_dict(column: ColumnSpec) -> dict:
    out: dict = {"name": column.name, "dtype": column.dtype, "kind": column.kind}
    if column.allowed_values:
        out["allowed_values"] = list(column.allowed_values)
    if column.min_value is not None:
        out["min_value"] = column.min_value
    if column.max_value is not None:
        out["max_value"] = column.max_value
    return out


def _parse_column(raw: dict, defaults: dict, where: str) -> ColumnSpec:
    merged = {**defaults, **raw}
    name = merged.get("name")
    if not name:
        raise SpecError(f"{where}: every column needs a 'name'")
    dtype = merged.get("dtype")
    if dtype not in _INTEGER_DTYPES | _FLOAT_DTYPES:
        raise SpecError(
            f"{where}: column {name!r} has dtype {dtype!r}; use one of {sorted(_INTEGER_DTYPES | _FLOAT_DTYPES)}"
        )
    kind = merged.get("kind", CATEGORICAL if "allowed_values" in merged else NUMERIC)
    if kind not in (CATEGORICAL, NUMERIC):
        raise SpecError(f"{where}: column {name!r} has kind {kind!r}; use categorical or numeric")
    allowed = tuple(merged.get("allowed_values") or ())
    if kind == CATEGORICAL and len(allowed) < 2:
        raise SpecError(f"{where}: categorical column {name!r} needs at least two allowed_values")
    return ColumnSpec(
        name=name,
        dtype=dtype,
        kind=kind,
        allowed_values=allowed,
        min_value=merged.get("min_value"),
        max_value=merged.get("max_value"),
    )


def _parse_limits(raw: object, where: str) -> IngestLimits:
    if raw is None:
        return IngestLimits()
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: 'limits' is a mapping such as {{max_file_bytes: 268435456, max_rows: 5000000}}")
    known = list(IngestLimits.__dataclass_fields__)
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {unknown} in 'limits'; known: {known}")
    for key, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SpecError(f"{where}: limits.{key} must be a positive integer, got {value!r}")
    return IngestLimits(**raw)


def _parse_feedback(raw: object, target: ColumnSpec, names: list[str], where: str) -> FeedbackSpec | None:
    """The ``feedback:`` section: ``prefix`` is required, the column names default to
    ``request_id``, the target's name and ``labelled_at``."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: 'feedback' is a mapping such as {{prefix: my_dataset_feedback}}")
    known = {"prefix", "request_id_column", "label_column", "labelled_at_column"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {unknown} in 'feedback'; known: {sorted(known)}")
    prefix = str(raw.get("prefix") or "").strip("/")
    if not prefix:
        raise SpecError(f"{where}: 'feedback' needs a 'prefix' (the key prefix of its drops in the raw bucket)")
    feedback = FeedbackSpec(
        prefix=prefix,
        label_column=str(raw.get("label_column", target.name)),
        request_id_column=str(raw.get("request_id_column", "request_id")),
        labelled_at_column=str(raw.get("labelled_at_column", "labelled_at")),
    )
    columns = feedback.column_names
    if len(set(columns)) != len(columns) or not all(columns):
        raise SpecError(f"{where}: the feedback columns must be three distinct names, got {columns}")
    clashing = sorted({feedback.request_id_column, feedback.labelled_at_column} & set(names))
    if clashing:
        raise SpecError(f"{where}: feedback column(s) {clashing} clash with the dataset's columns; rename them")
    return feedback


def load_spec(name_or_path: str | Path) -> DatasetSpec:
    """Load a dataset spec by name (``include/datasets/<name>.yaml``) or path.

    Args:
        name_or_path: Dataset name such as ``network_security``, or a path to a YAML spec.

    Returns:
        The parsed, checked spec.

    Raises:
        SpecError: The file is missing or a field is invalid; the message says which.
    """
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = DATASETS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in DATASETS_DIR.glob("*.yaml"))
        raise SpecError(f"dataset spec {str(path)!r} not found; known datasets: {known}")
    raw = yaml.safe_load(path.read_text())
    where = str(path)
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: a dataset spec is a YAML mapping (name, features, target, ...)")
    if not all(isinstance(c, dict) for c in raw.get("features") or []):
        raise SpecError(f"{where}: each entry of 'features' is a mapping such as {{name: x, dtype: float64}}")
    defaults = raw.get("feature_defaults", {})
    features = tuple(_parse_column(c, defaults, where) for c in raw.get("features", []))
    if not features:
        raise SpecError(f"{where}: 'features' is empty")
    target = _parse_column(raw.get("target", {}), {}, where)
    if target.kind != CATEGORICAL or len(target.allowed_values) != 2:
        raise SpecError(f"{where}: target {target.name!r} must be categorical with two allowed_values")
    positive = raw.get("positive_class")
    if positive not in target.allowed_values:
        raise SpecError(
            f"{where}: positive_class {positive!r} is not one of the target's "
            f"allowed_values {list(target.allowed_values)}"
        )
    names = [c.name for c in (*features, target)]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise SpecError(f"{where}: duplicated column names {duplicated}")
    limits = _parse_limits(raw.get("limits"), where)
    if limits.max_columns < len(names):
        raise SpecError(f"{where}: limits.max_columns = {limits.max_columns} is below the spec's {len(names)} columns")
    bounds = tuple(raw.get("positive_fraction_bounds", (0.05, 0.95)))
    if len(bounds) != 2 or not 0 <= bounds[0] < bounds[1] <= 1:
        raise SpecError(f"{where}: positive_fraction_bounds must be [low, high] within [0, 1]")
    return DatasetSpec(
        name=raw.get("name", path.stem),
        description=raw.get("description", "").strip(),
        features=features,
        target=target,
        positive_class=positive,
        min_rows=int(raw.get("min_rows", 100)),
        max_null_fraction=float(raw.get("max_null_fraction", 0.0)),
        positive_fraction_bounds=(float(bounds[0]), float(bounds[1])),
        drop_duplicates=bool(raw.get("drop_duplicates", False)),
        raw_prefix=raw.get("raw_prefix", raw.get("name", path.stem)),
        limits=limits,
        source_file=path,
        feedback=_parse_feedback(raw.get("feedback"), target, names, where),
    )


def available_datasets() -> list[str]:
    """Names of the datasets with a spec under ``include/datasets/``."""
    return sorted(p.stem for p in DATASETS_DIR.glob("*.yaml"))
