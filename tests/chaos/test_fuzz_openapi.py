"""Fuzz every route and method of the app's own /openapi.json with schemathesis (pinned in
pyproject's test extra): valid and invalid bodies, parameters and headers, a bounded number of
examples per operation. Whatever comes in: never a response >= 500, and every 4xx in OpenAI's
error shape ({"error": {"message", "type", "param", "code"}})."""

from __future__ import annotations

import re

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

pytestmark = pytest.mark.serve

EXAMPLES_PER_OPERATION = 8  # bounded: the suite's CI budget (the soak in bench/ runs longer)
ERROR_FIELDS = {"message", "type", "param", "code"}
MODES = {"valid": GenerationMode.POSITIVE, "invalid": GenerationMode.NEGATIVE}


def operation_cases() -> list[tuple[str, str]]:
    """(operation, mode) for every operation the Ingress serves, from the same FastAPI app (test ids
    at collection; the test fuzzes the live app's /openapi.json). Invalid inputs only where there is
    an input to get wrong (a body or parameters)."""
    from app.ingress.server import api

    cases = []
    for path, ops in api.openapi()["paths"].items():
        for method, spec in ops.items():
            label = f"{method.upper()} {path}"
            cases.append((label, "valid"))
            if can_be_invalid(spec):
                cases.append((label, "invalid"))
    return cases


def can_be_invalid(spec: dict) -> bool:
    """A body, or a parameter whose schema refuses some value: a free-form string in the path
    (an id like /v1/jobs/{job_id}) accepts every value, so there is nothing invalid to generate."""
    if spec.get("requestBody"):
        return True
    for param in spec.get("parameters", []):
        schema = param.get("schema", {})
        free_string = schema.get("type") == "string" and not (set(schema) & {"pattern", "enum", "minLength", "maxLength", "format"})
        if not (param.get("in") == "path" and free_string):
            return True
    return False


@pytest.fixture(scope="module")
def live_schema(stack):
    return schemathesis.openapi.from_url(f"{stack.base_url}/openapi.json")


# schemathesis' own pytest integration (`schema.parametrize`) fails under pytest 9 ("'Function'
# object has no attribute '_nodeid'"), so each operation's strategy drives hypothesis directly.
@pytest.mark.parametrize(("label", "mode"), operation_cases())
def test_every_operation_never_5xx_and_errors_are_openai_shaped(live_schema, stack, label, mode):
    operations = [r.ok() for r in live_schema.get_all_operations()]
    [operation] = [op for op in operations if f"{op.method.upper()} {op.path}" == label]

    @given(case=operation.as_strategy(generation_mode=MODES[mode]))
    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case) -> None:
        response = case.call(base_url=stack.base_url, timeout=120)
        where = f"{case.method} {case.formatted_path} body={str(case.body)[:300]}"
        assert response.status_code < 500, f"{where}: {response.status_code} {response.text[:500]}"
        if 400 <= response.status_code < 500:
            body = response.json()
            assert isinstance(body, dict) and isinstance(body.get("error"), dict), f"{where}: {response.text[:500]}"
            assert ERROR_FIELDS <= set(body["error"]), f"{where}: {response.text[:500]}"
            assert isinstance(body["error"]["message"], str) and body["error"]["message"]

    check()


def assert_openai_error(response: httpx.Response) -> None:
    assert 400 <= response.status_code < 500, f"{response.request.method} {response.request.url}: {response.status_code}"
    error = response.json().get("error")
    assert isinstance(error, dict) and ERROR_FIELDS <= set(error), response.text[:500]


def test_methods_a_route_does_not_declare_are_4xx_in_openai_shape(stack):
    """The methods schemathesis does not generate: each route's undeclared ones (405 expected)."""
    spec = httpx.get(f"{stack.base_url}/openapi.json", timeout=60).json()
    checked = 0
    for path, operations in spec["paths"].items():
        url = stack.base_url + re.sub(r"{[^}]+}", "x", path)
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
            if method.lower() not in operations:
                assert_openai_error(httpx.request(method, url, timeout=60))
                checked += 1
    assert checked > 0
