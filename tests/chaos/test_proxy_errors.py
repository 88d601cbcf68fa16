"""app/proxy_errors.py as an ASGI middleware, driven with httpx's ASGI transport: an app (Serve's
proxy) that ends without a response gets a JSON 503 + Retry-After; anything answered passes as is.
The whole path (a killed Ingress behind the real proxy) is in test_chaos_serve.py."""

from __future__ import annotations

import httpx
import pytest

from app.proxy_errors import ReplicaFailureAs503, proxy_middlewares


async def silent(scope, receive, send):  # what Serve's proxy does when the Ingress actor died
    return None


async def raising(scope, receive, send):
    raise RuntimeError("boom")


async def answering(scope, receive, send):
    await send({"type": "http.response.start", "status": 201, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"fine"})


async def get(app) -> httpx.Response:
    transport = httpx.ASGITransport(app=ReplicaFailureAs503(app))
    async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as client:
        return await client.post("/v1/completions", json={"prompt": "x"})


@pytest.mark.parametrize("app", [silent, raising])
async def test_no_response_becomes_an_openai_shaped_503_with_retry_after(app):
    resp = await get(app)
    assert resp.status_code == 503
    assert resp.headers["content-type"] == "application/json" and int(resp.headers["retry-after"]) >= 1
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "overloaded_error"


async def test_a_response_the_app_sent_passes_unchanged():
    resp = await get(answering)
    assert (resp.status_code, resp.text) == (201, "fine")


def test_the_callback_returns_starlette_middlewares_as_ray_serve_requires():
    from ray.serve._private.http_util import validate_http_proxy_callback_return

    assert validate_http_proxy_callback_return(proxy_middlewares())[0].cls is ReplicaFailureAs503
