"""Request and response models of the model server, request models generated from the dataset spec.

The spec that drives ingestion and validation also decides what a request may hold, so
the API rejects exactly what the pipeline would never have trained on: a missing,
extra or ill-typed feature is FastAPI's 422 naming the field, never a model error.
"""

from __future__ import annotations

import itertools
import keyword
import math
from collections.abc import Sequence
from typing import Annotated, Any, Literal, NamedTuple

import msgspec
import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model
from pydantic_core import PydanticCustomError

from serving.prediction_log import RESERVED_RECORD_KEYS
from tasks.dataset_spec import CATEGORICAL, ColumnSpec, DatasetSpec

# Dtypes whose every value float64 holds exactly (int64 may not: beyond 2**53).
EXACT_IN_FLOAT64 = frozenset({"int8", "int16", "int32", "float32", "float64"})


def _strict_int(value: Any) -> Any:
    # Literal[-1, 0, 1] alone accepts true and 1.0 (they compare equal to 1): insist on a JSON integer.
    if type(value) is not int:
        raise PydanticCustomError("int_type", "Input should be a valid integer")
    return value


def _strict_number(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PydanticCustomError("float_type", "Input should be a valid number")
    return value


def _numeric_bounds(column: ColumnSpec) -> tuple[int | float, int | float]:
    """Inclusive (low, high) of a numeric column: the spec's bounds within the range of its dtype."""
    # The pipeline casts requests to the spec's dtype: values outside it would wrap or become inf.
    info = np.iinfo(column.dtype) if column.is_integer else np.finfo(column.dtype)
    # As Python numbers: numpy 2 gives ints for iinfo and numpy floats for finfo.
    kind = int if column.is_integer else float
    low = kind(info.min) if column.min_value is None else max(column.min_value, kind(info.min))
    high = kind(info.max) if column.max_value is None else min(column.max_value, kind(info.max))
    return low, high


def _field_type(column: ColumnSpec) -> tuple[Any, dict[str, Any]]:
    """The annotation and Field arguments accepting exactly the values the spec allows."""
    if column.kind == CATEGORICAL:
        allowed = Literal[tuple(column.allowed_values)]  # type: ignore[valid-type]
        check = _strict_int if column.is_integer else _strict_number
        return Annotated[allowed, BeforeValidator(check)], {}
    low, high = _numeric_bounds(column)
    if column.is_integer:
        return int, {"strict": True, "ge": low, "le": high}
    return float, {"strict": True, "allow_inf_nan": False, "ge": low, "le": high}


def _identifier(index: int, name: str) -> str:
    # Python attribute names must be identifiers and must not shadow BaseModel's own; the JSON
    # name is the alias, so requests and 422 messages use the spec's column name regardless.
    if (
        name.isidentifier()
        and not keyword.iskeyword(name)
        and not name.startswith("_")
        and not hasattr(BaseModel, name)
    ):
        return name
    return f"feature_{index}"


def record_model(spec: DatasetSpec) -> type[BaseModel]:
    """A pydantic model of one request record: every feature of ``spec``, required, nothing else.

    Categorical features accept only their allowed values (as JSON integers for integer
    columns); numeric ones finite numbers within the spec's bounds and the column dtype.
    Dump with ``model_dump(by_alias=True)`` to get the spec's column names.

    Args:
        spec: The dataset the served model was trained on.

    Returns:
        The generated model class, named after the dataset.

    Raises:
        ValueError: A feature name collides with a prediction-log field.
    """
    clashes = sorted(RESERVED_RECORD_KEYS & set(spec.feature_names))
    if clashes:
        raise ValueError(f"dataset {spec.name!r} has features named like prediction-log fields: {clashes}")
    fields: dict[str, Any] = {}
    for index, column in enumerate(spec.features):
        annotation, constraints = _field_type(column)
        fields[_identifier(index, column.name)] = (annotation, Field(alias=column.name, **constraints))
    title = "".join(part.capitalize() for part in spec.name.split("_")) + "Record"
    return create_model(title, __config__=ConfigDict(extra="forbid", populate_by_name=False, title=title), **fields)


def batch_model(record: type[BaseModel], max_batch_size: int) -> type[BaseModel]:
    """A pydantic model of ``{"records": [record, ...]}`` with 1 to ``max_batch_size`` records."""
    title = record.__name__.removesuffix("Record") + "Batch"
    records_type = list[record]  # type: ignore[valid-type]
    return create_model(
        title,
        __config__=ConfigDict(extra="forbid", title=title),
        records=(records_type, Field(min_length=1, max_length=max_batch_size)),
    )


class FastDecoder:
    """Decodes valid request bodies straight from JSON bytes (msgspec), for the hot path.

    It accepts exactly the bodies the pydantic models of ``record_model`` and
    ``batch_model`` accept, and nothing else: anything it refuses goes to FastAPI's own
    validation, which answers with the documented 422. Feature values come back as a
    tuple per record, in the spec's feature order.

    Build it with ``fast_decoder``, which returns None for specs it cannot mirror.
    """

    def __init__(self, record: type[msgspec.Struct], batch: type[msgspec.Struct], exact_in_float64: bool) -> None:
        self._record = msgspec.json.Decoder(record)
        self._batch = msgspec.json.Decoder(batch)
        self.width = len(record.__struct_fields__)
        self.exact_in_float64 = exact_in_float64

    def record(self, body: bytes) -> tuple[Any, ...] | None:
        """The record's feature values, or None when the body is not a valid record."""
        try:
            return msgspec.structs.astuple(self._record.decode(body))
        except msgspec.MsgspecError:
            return None

    def batch(self, body: bytes) -> DecodedBatch | None:
        """The records' feature values, or None when the body is not a valid batch."""
        try:
            records = self._batch.decode(body).records  # type: ignore[attr-defined]
        except msgspec.MsgspecError:
            return None
        astuple = msgspec.structs.astuple
        if not self.exact_in_float64:
            rows = [astuple(record) for record in records]
            return DecodedBatch(rows, rows)
        # One pass over the decoded values, no list of tuples in between.
        values = itertools.chain.from_iterable(map(astuple, records))
        flat = np.fromiter(values, dtype=np.float64, count=len(records) * self.width)
        return DecodedBatch(flat.reshape(len(records), self.width), records)


class DecodedBatch(NamedTuple):
    """A decoded batch body.

    Attributes:
        rows: What the predictor scores: a float64 matrix (one row per record) when float64
            holds every allowed value exactly, else one tuple per record.
        records: The values as decoded (msgspec structs or tuples, in the spec's feature
            order), for the prediction log: they keep each value's JSON type.
    """

    rows: Any
    records: Sequence[Any]


def fast_decoder(spec: DatasetSpec, max_batch_size: int) -> FastDecoder | None:
    """A ``FastDecoder`` mirroring ``record_model(spec)``, or None when msgspec cannot express it.

    Integer categorical features become integer literals (JSON integers only, like
    ``_strict_int``), numeric ones bounded ints or floats as in ``_field_type``. msgspec has
    no float literals, so a spec with a float categorical feature gets no fast decoder.
    """
    fields: list[tuple[str, Any, Any]] = []
    for index, column in enumerate(spec.features):
        if column.kind == CATEGORICAL:
            if not column.is_integer or not all(type(v) is int for v in column.allowed_values):
                return None
            kind: Any = Literal[tuple(column.allowed_values)]  # type: ignore[valid-type]
        else:
            low, high = _numeric_bounds(column)
            if column.is_integer:
                kind = Annotated[int, msgspec.Meta(ge=math.ceil(low), le=math.floor(high))]
            else:
                kind = Annotated[float, msgspec.Meta(ge=float(low), le=float(high))]
        fields.append((f"f{index}", kind, msgspec.field(name=column.name)))
    record = msgspec.defstruct(f"{spec.name}_record", fields, forbid_unknown_fields=True)
    records = Annotated[list[record], msgspec.Meta(min_length=1, max_length=max_batch_size)]  # type: ignore[valid-type]
    batch = msgspec.defstruct(f"{spec.name}_batch", [("records", records)], forbid_unknown_fields=True)
    return FastDecoder(record, batch, all(c.dtype in EXACT_IN_FLOAT64 for c in spec.features))


class Prediction(BaseModel):
    """The model's answer for one record."""

    label: int | float = Field(description="Predicted label, as the dataset spec writes it (e.g. -1 = phishing).")
    probability: float = Field(ge=0.0, le=1.0, description="Probability of the dataset's positive class.")
    model_name: str
    model_version: str
    request_id: str = Field(description="Identifier of this prediction in the prediction log.")


class BatchPrediction(BaseModel):
    """The model's answers for a batch, in the order of the request's records."""

    predictions: list[Prediction]
    model_version: str
    request_id: str


class ModelInfo(BaseModel):
    """The model being served and where it came from."""

    model_name: str
    model_version: str
    alias: str | None = Field(description="Alias followed, or null when a version is pinned.")
    run_id: str | None
    training_data_sha256: str | None = Field(description="Content hash of the data the model was trained on.")
    loaded_at: str


class ReloadResult(BaseModel):
    """Outcome of ``POST /admin/reload``."""

    old_version: str | None
    new_version: str
    reloaded: bool = Field(description="False when the alias still pointed at the served version.")


class Status(BaseModel):
    status: str
    model_version: str | None = Field(default=None, description="Version of the default model.")
    detail: str | None = None
    models: dict[str, str | None] | None = Field(
        default=None, description="Every served model and the version its baseline serves (null: not loaded)."
    )


class ReleaseSummary(BaseModel):
    mode: Literal["shadow", "canary"]
    candidate_version: str
    weight: float


class ModelDetail(ModelInfo):
    """A served model: its baseline (as ``GET /model``), its dataset and its running release."""

    dataset: str
    release: ReleaseSummary | None = Field(description="The running release, or null.")


class ModelSummary(BaseModel):
    model_name: str
    dataset: str
    model_version: str | None = Field(description="Version the baseline serves, null while it loads.")
    alias: str | None
    ready: bool
    release: ReleaseSummary | None


class ModelList(BaseModel):
    """``GET /models``: what the server serves; ``default`` answers ``/predict``."""

    default: str
    models: list[ModelSummary]


class ModelConfig(BaseModel):
    """Body of ``PUT /admin/models/{name}``: serve a registered model beside the others."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(pattern=r"^[a-z][a-z0-9_]{0,99}$", description="Dataset spec name of its requests.")
    alias: str = Field(default="champion", pattern=r"^[A-Za-z0-9_-]{1,100}$", description="Alias the baseline follows.")
    version: str | None = Field(default=None, pattern=r"^[1-9][0-9]{0,9}$", description="Pin a version instead.")


class FaultSpec(BaseModel):
    """Faults injected into the candidate only (refused unless the server runs with FAULT_INJECTION=true)."""

    model_config = ConfigDict(extra="forbid")

    error_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    latency_ms: float = Field(default=0.0, ge=0.0, le=60_000.0)


class ReleaseRequest(BaseModel):
    """Body of ``POST /admin/models/{name}/release``."""

    model_config = ConfigDict(extra="forbid")

    candidate_version: str = Field(pattern=r"^[1-9][0-9]{0,9}$")
    mode: Literal["shadow", "canary"]
    weight: float = Field(default=0.0, ge=0.0, le=1.0, description="Share of request ids the canary answers.")
    fault: FaultSpec | None = None


class ErrorDetail(BaseModel):
    """Body of 401, 403 and 503 answers."""

    detail: str
