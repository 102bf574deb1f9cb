"""Property-based API test: schemathesis generates requests from the app's own OpenAPI schema.

Whatever it sends, valid or not, the server must answer without a 5xx and as documented.
Bounded to a few dozen examples per operation so the suite stays fast.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from schemathesis import GenerationMode

from serving.app import create_app
from tests.serving.conftest import ADMIN_KEY, API_KEY, Registry, loaded_store, make_log, make_settings


class _MemoryS3:
    """Stands in for S3: schemathesis runs the app's lifespan itself, outside any moto mock's lifetime."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def put_object(self, *, Bucket: str, Key: str, Body: bytes, **_: Any) -> dict[str, Any]:  # noqa: N803
        self.objects[f"{Bucket}/{Key}"] = Body
        return {}


@pytest.fixture(scope="module", autouse=True)
def hypothesis_storage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    # Hypothesis caches what it learns under ./.hypothesis (even without an example database):
    # keep it out of the working tree.
    set_hypothesis_home_dir(tmp_path_factory.mktemp("hypothesis"))
    yield
    set_hypothesis_home_dir(None)


@pytest.fixture(scope="module")
def api_schema(registry: Registry) -> Any:
    registry.move_alias("champion", "1")
    app = create_app(make_settings(registry), store=loaded_store(registry), prediction_log=make_log(_MemoryS3()))
    return schemathesis.openapi.from_asgi("/openapi.json", app)


# Listed here (and checked against the schema) rather than collected by schemathesis's pytest
# plugin: its lazy fixture loader reads pytest's private Item._nodeid, gone in pytest 9.2.
OPERATIONS = [
    "GET /health",
    "GET /ready",
    "GET /metrics",
    "GET /model",
    "POST /predict",
    "POST /predict/batch",
    "POST /admin/reload",
    "GET /models",
    "GET /models/{name}",
    "POST /models/{name}/predict",
    "POST /models/{name}/predict/batch",
    "POST /admin/models/{name}/reload",
    "PUT /admin/models/{name}",
    "GET /admin/models/{name}/release",
    "POST /admin/models/{name}/release",
    "POST /admin/models/{name}/release/abort",
    "POST /admin/models/{name}/release/complete",
]


def test_every_operation_is_fuzzed(api_schema: Any):
    assert sorted(result.ok().label for result in api_schema.get_all_operations()) == sorted(OPERATIONS)


@pytest.mark.parametrize("operation", OPERATIONS)
def test_generated_requests_never_get_a_server_error(api_schema: Any, operation: str):
    method, path = operation.split(" ")
    endpoint = api_schema[path][method]
    valid_and_invalid = st.one_of(
        endpoint.as_strategy(GenerationMode.POSITIVE), endpoint.as_strategy(GenerationMode.NEGATIVE)
    )

    @given(case=valid_and_invalid)
    @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def answers_as_documented(case: schemathesis.Case) -> None:
        case.call_and_validate(headers={"X-API-Key": ADMIN_KEY if path.startswith("/admin/") else API_KEY})

    answers_as_documented()
