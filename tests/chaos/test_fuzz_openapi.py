"""Fuzz every route and method of the app's own /openapi.json with schemathesis (pinned in
pyproject's test extra): valid and invalid bodies, parameters and headers, a bounded number of
examples per operation. Whatever comes in: never a response >= 500, and every 4xx in OpenAI's
error shape ({"error": {"message", "type", "param", "code"}})."""

from __future__ import annotations

import re

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

pytestmark = pytest.mark.serve

EXAMPLES_PER_OPERATION = 12  # bounded: the suite's CI budget (the soak in bench/ runs longer)
ERROR_FIELDS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def app_schema(stack):
    schema = schemathesis.openapi.from_url(f"{stack.base_url}/openapi.json")
    schema.config.base_url = stack.base_url  # (also passed to each call below)
    return schema


schema = schemathesis.pytest.from_fixture("app_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_every_operation_never_5xx_and_errors_are_openai_shaped(case, stack):
    response = case.call(base_url=stack.base_url, timeout=120)
    assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:500]}"
    if 400 <= response.status_code < 500:
        body = response.json()
        assert isinstance(body, dict) and isinstance(body.get("error"), dict), response.text[:500]
        assert ERROR_FIELDS <= set(body["error"]), response.text[:500]
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]


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
