"""The browser playground: the page at `/`, its static files, and `GET /stream` for EventSource.

`EventSource` cannot send headers, so `GET /stream` is authenticated by a short-lived signed token
from `POST /v1/stream_tokens` (which itself needs the API key): the key never appears in a URL.
`GET /stream?prompt=...` runs the same chat completion as `POST /v1/chat/completions` (same
validation, limits and error bodies before the stream starts) and sends each increment as plain
text in `data:` lines, so `new EventSource('/stream?prompt=hi').onmessage = e => out += e.data`
works. It ends with `event: done` (finish reason and usage as JSON); an error mid-stream is an
`event: error` with OpenAI's error body. Events carry ids, and a reconnect (which sends
`Last-Event-ID`) gets 204, which tells the browser to stop: a finished answer is not re-run.
"""


import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pydantic
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse

from app.config import PlaygroundSettings
from app.errors import AuthenticationError, NotFoundError, ValidationError
from app.ingress.openai_api import _chat
from app.ingress.openai_protocol import ChatCompletionRequest
from app.security import SecuritySettings

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
_STATIC_NAME = re.compile(r"^[a-z0-9_-]+\.(html|js|css|svg|png)$")
_MEDIA_TYPES = {"html": "text/html", "js": "text/javascript", "css": "text/css", "svg": "image/svg+xml",
                "png": "image/png"}
# The page may talk only to this server: no CDN, no external request of any kind.
_PAGE_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'",
    "cache-control": "no-cache",
    "x-content-type-options": "nosniff",
}
_STREAM_PARAMS = ("prompt", "system", "model", "max_tokens", "temperature", "top_p", "token")


def is_browser_path(path: str) -> bool:
    """Routes a browser reaches without an Authorization header: the page, its files, and
    /stream (which checks a signed token itself)."""
    return path in ("/", "/stream") or path.startswith("/static/")


# -- stream tokens ---------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class StreamTokens:
    """HMAC-signed `{key id, expiry}` tokens: `payload.signature`, both base64url."""

    def __init__(self, secret: bytes, ttl_s: float):
        self.secret = secret
        self.ttl_s = ttl_s

    @classmethod
    def from_settings(cls, settings: PlaygroundSettings) -> "StreamTokens":
        configured = os.environ.get(settings.stream_token_secret_env or "")
        secret = configured.encode("utf-8") if configured else _process_secret()
        return cls(secret, settings.stream_token_ttl_s)

    def mint(self, key_id: str | None, now: float | None = None) -> tuple[str, int]:
        expires_at = int((time.time() if now is None else now) + self.ttl_s)
        payload = _b64(json.dumps({"k": key_id, "e": expires_at, "n": secrets.token_hex(4)}).encode())
        return f"{payload}.{self._sign(payload)}", expires_at

    def verify(self, token: str | None, now: float | None = None) -> str | None:
        """The key id the token was minted for; AuthenticationError if it is not valid now."""
        if not token:
            raise AuthenticationError(
                "GET /stream needs a token: get one from POST /v1/stream_tokens (with your API key) "
                "and pass it as ?token=...", code="missing_stream_token")
        payload, _, signature = token.partition(".")
        try:
            valid = hmac.compare_digest(signature.encode(), self._sign(payload).encode())
            claims = json.loads(_unb64(payload)) if valid else None
        except (ValueError, TypeError):  # not ASCII, not base64, not JSON: not ours
            claims = None
        if not isinstance(claims, dict) or not isinstance(claims.get("e"), int):
            raise AuthenticationError("the stream token is not valid", code="invalid_stream_token")
        if claims["e"] < (time.time() if now is None else now):
            raise AuthenticationError("the stream token has expired", code="expired_stream_token")
        return claims["k"]

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self.secret, payload.encode("ascii"), hashlib.sha256).digest())


_SECRET: list[bytes] = []


def _process_secret() -> bytes:
    if not _SECRET:
        _SECRET.append(secrets.token_bytes(32))
    return _SECRET[0]


# -- /stream ---------------------------------------------------------------------------------------


def _chat_body(gateway, query: dict[str, str]) -> ChatCompletionRequest:
    """The chat completion a /stream query asks for, validated like the POST body."""
    unknown = sorted(set(query) - set(_STREAM_PARAMS))
    if unknown:
        raise ValidationError(f"unknown query parameter '{unknown[0]}'", param=unknown[0], code="invalid_value")
    if not query.get("prompt"):
        raise ValidationError("invalid value for 'prompt': a non-empty prompt is required", param="prompt",
                              code="invalid_value")
    messages = [{"role": "user", "content": query["prompt"]}]
    if query.get("system"):
        messages.insert(0, {"role": "system", "content": query["system"]})
    body: dict[str, Any] = {
        "model": query.get("model") or gateway.limits.name, "messages": messages, "stream": True,
        "stream_options": {"include_usage": True},
        **{k: query[k] for k in ("max_tokens", "temperature", "top_p") if query.get(k)},
    }
    try:
        return ChatCompletionRequest.model_validate(body)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        loc = first.get("loc", ())
        param = ("system" if len(messages) == 2 and loc[1:2] == (0,) else "prompt") if loc[:1] == ("messages",) \
            else str(loc[0]) if loc else "query"
        raise ValidationError(f"invalid value for '{param}': {first.get('msg')}", param=param,
                              code="invalid_value") from None


def _text_event(event_id: int, text: str) -> str:
    # One data line per line of text: EventSource joins them with "\n" again.
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return f"id: {event_id}\n" + "".join(f"data: {line}\n" for line in lines) + "\n"


def _sse_payloads(written: str) -> list[str]:
    """The `data:` payloads of the SSE events in one write (the OpenAI routes write one event per
    token but join the events of one increment into a single write)."""
    return [line[len("data:"):].strip() for line in written.split("\n") if line.startswith("data:")]


async def _plain_text_events(openai_sse: AsyncIterator[Any]) -> AsyncIterator[str]:
    """OpenAI chunks (SSE) -> plain-text increments, then `done` (or `error`)."""
    event_id, finish, usage, ended = 0, None, None, False
    try:
        async for raw in openai_sse:
            written = raw.decode() if isinstance(raw, bytes) else raw
            texts: list[str] = []
            for payload in _sse_payloads(written):  # one write may carry several events
                if payload == "[DONE]":
                    ended = True
                    break
                chunk = json.loads(payload)
                if "error" in chunk:
                    event_id += 1
                    yield f"id: {event_id}\nevent: error\ndata: {json.dumps(chunk)}\n\n"
                    return
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices", []):
                    finish = choice.get("finish_reason") or finish
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        texts.append(text)
            if texts:  # the increment leaves as one event, as it left the replica
                event_id += 1
                yield _text_event(event_id, "".join(texts))
            if ended:
                break
        event_id += 1
        yield f"id: {event_id}\nevent: done\ndata: {json.dumps({'finish_reason': finish, 'usage': usage})}\n\n"
    finally:
        aclose = getattr(openai_sse, "aclose", None)
        if aclose is not None:
            await aclose()  # closes the chat stream, which aborts the request in the engine


# -- routes ----------------------------------------------------------------------------------------


def playground_router(gateway_of, auth_of) -> APIRouter:
    """`auth_of()` returns the Authenticator, or None when no API keys are configured."""
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    async def page(request: Request) -> Response:
        _enabled(gateway_of(request).settings.playground)
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=_PAGE_HEADERS)

    @router.get("/static/{name}", include_in_schema=False)
    async def static_file(name: str, request: Request) -> Response:
        _enabled(gateway_of(request).settings.playground)
        path = STATIC_DIR / name
        if not _STATIC_NAME.match(name) or not path.is_file():
            raise NotFoundError(f"no static file '{name}'", code="route_not_found")
        media = _MEDIA_TYPES[name.rsplit(".", 1)[1]]
        return FileResponse(path, media_type=media, headers=_PAGE_HEADERS)

    @router.post("/v1/stream_tokens")
    async def stream_token(request: Request) -> JSONResponse:
        settings = gateway_of(request).settings.playground
        _enabled(settings)
        token, expires_at = StreamTokens.from_settings(settings).mint(getattr(request.state, "key_id", None))
        return JSONResponse({"object": "stream_token", "token": token, "expires_at": expires_at,
                             "expires_in_s": settings.stream_token_ttl_s})

    @router.get("/stream")
    async def stream(request: Request) -> Response:
        gateway = gateway_of(request)
        _enabled(gateway.settings.playground)
        if request.headers.get("last-event-id") is not None:
            return Response(status_code=204)  # EventSource reconnecting after the end: stop it
        query = dict(request.query_params)
        auth = auth_of()
        if auth is not None:
            key_id = StreamTokens.from_settings(gateway.settings.playground).verify(query.get("token"))
            _act_as_key(request, auth.settings, key_id)
        answer = await _chat(gateway, _chat_body(gateway, query), request)
        return StreamingResponse(_plain_text_events(answer.body_iterator), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache"})

    return router


def _enabled(settings: PlaygroundSettings) -> None:
    if not settings.enabled:
        raise NotFoundError("the playground is turned off (playground.enabled)", code="route_not_found")


def _act_as_key(request: Request, security: SecuritySettings, key_id: str | None) -> None:
    """Give the request the identity (tenant, priorities) of the key the token was minted for."""
    key = next((k for k in security.api_keys if k.id == key_id), None)
    if key is None:
        raise AuthenticationError("the stream token names no configured API key", code="invalid_stream_token")
    request.state.key_id = request.state.tenant = key.id
    request.state.priority = key.priority
    request.state.max_priority = key.max_priority
