"""The ingress's guard: route scopes, request ownership, per-key rate limits and content filters.

Where each check runs:
- `authorize_route` (from the RequestContext middleware, after the key is authenticated): the
  scope the matched route needs (app.security.ROUTE_SCOPES) -> 403 `insufficient_scope`. It
  matches the request against every route of the app, so a route cannot slip past it.
- `guard_request` (a FastAPI dependency of every API route): a non-admin `/abort_request` must
  name the key's own in-flight request (404 otherwise; `abort_all` is admin-only: 403); the rate
  limit (429 + Retry-After); the input filters (403 `content_filter`, or 503 when a filter fails
  and `safety.on_error` is "closed").
- The route handlers call `remember` (which key owns which rids), `filter_stream` /
  `filter_outputs` (output filters; a flagged stream ends with finish_reason `content_filter`),
  and for /run `filter_run_result` / `filter_run_stream` (the program's text and variables).
- `settle` (from the middleware, once the response has gone out): gives back the tokens a request
  was charged but did not use, forgets its rids.
- `response_headers`: the x-ratelimit-* headers, added by the middleware to every response of a
  rate-limited key, refusals included.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.routing import compile_path

from app.errors import APIError, NotFoundError, OverloadedError, PermissionDeniedError, RateLimitError
from app.ingress.prepare import OffLoop
from app.ownership import LocalOwners, OwnerRegistry, RedisOwners
from app.protocol import FinishReason, GenerateOutput, GenerateRequest
from app.ratelimit import BackendUnavailable, LocalBuckets, RateLimit, RateLimitBackend, RedisBuckets, redis_client
from app.safety.filters import FilterChain, FilterFailure, Verdict
from app.security import ADMIN, PUBLIC, ApiKey, authorize, required_scope

logger = logging.getLogger("sglserve.guard")

ANONYMOUS = "anonymous"  # the rate-limit key of callers when no API keys are configured


class ContentFilterError(APIError):
    """403: a content filter refused the prompt (OpenAI's code `content_filter`)."""

    status_code = 403
    error_type = "invalid_request_error"


@dataclass
class Charge:
    key_id: str
    limits: RateLimit
    tokens: float


class Guard:
    def __init__(self, settings: Any, tokenizer: Any = None, backend: RateLimitBackend | None = None,
                 owners: OwnerRegistry | None = None):
        self.settings = settings
        self.tokenizer = tokenizer
        self.off_loop = OffLoop(settings.ingress.tokenize_inline_max_chars)
        limits = settings.rate_limits
        client = None
        if limits.backend == "redis" and (backend is None or owners is None):
            if not limits.redis_url:
                raise ValueError("rate_limits.backend 'redis' needs rate_limits.redis_url")
            client = redis_client(limits.redis_url, limits.backend_timeout_s)
        self.buckets = backend or (RedisBuckets(client, limits.key_prefix) if client else LocalBuckets())
        self.owners = owners or (RedisOwners(client, limits.key_prefix) if client else LocalOwners())
        safety = settings.safety
        self.inputs = FilterChain(safety.input_filters, safety.timeout_ms, safety.max_workers)
        self.outputs = FilterChain(safety.output_filters, safety.timeout_ms, safety.max_workers)
        # Anything for guard_request to do? (No keys, limits or input filters: the default config.)
        self.active = bool(settings.security.enabled or limits.default is not None or self.inputs)

    # -- rate limits -----------------------------------------------------------------------------

    def limits_for(self, key: ApiKey | None) -> RateLimit | None:
        return (key.rate_limit if key is not None else None) or self.settings.rate_limits.default

    async def rate_limit(self, request: Request, key: ApiKey | None, tokens: float) -> None:
        limits = self.limits_for(key)
        if limits is None:
            return
        key_id = key.id if key is not None else ANONYMOUS
        try:
            decision = await asyncio.wait_for(self.buckets.acquire(key_id, limits, tokens),
                                              self.settings.rate_limits.backend_timeout_s)
        except (BackendUnavailable, asyncio.TimeoutError, OSError) as exc:
            if self.settings.rate_limits.on_backend_error == "open":
                logger.warning("rate-limit store unavailable, admitting: %s", exc)
                return
            raise OverloadedError("the rate-limit store is unavailable; retry shortly", code="rate_limit_unavailable") from None
        headers = decision.headers()
        request.state.ratelimit_headers = headers
        if decision.allowed:
            request.state.ratelimit_charge = Charge(key_id, limits, tokens)
            return
        if decision.too_large:
            raise RateLimitError(
                f"the request needs up to {tokens:.0f} tokens (prompt + max output), more than the "
                f"key's token bucket holds ({decision.tokens.capacity:.0f}): lower max_tokens",
                code="request_too_large")
        which = "requests" if decision.requests is not None and decision.requests_left < 1 else "tokens"
        raise RateLimitError(
            f"rate limit reached for {which} per minute on key '{key_id}'; "
            f"try again in {headers['Retry-After']} s", code="rate_limit_exceeded")

    async def settle(self, request: Request, sequences: list[Any], status: int = 200) -> None:
        """After the response: refund the tokens charged but unused (`sequences`: what the request
        generated, app.metrics.SequenceRecord); forget the request's rids. A refused request
        (status >= 400, nothing generated) gets all back; a served one that recorded no sequence
        (/run: its program's calls are the scheduler's) keeps its charge."""
        state = request.state
        charge: Charge | None = getattr(state, "ratelimit_charge", None)
        if charge is not None and charge.limits.tokens_per_minute and (sequences or status >= 400):
            used = sum(s.prompt_tokens + s.completion_tokens for s in sequences)
            back = charge.tokens - used
            if back:
                try:
                    await self.buckets.adjust(charge.key_id, charge.limits, back)
                except Exception:  # noqa: BLE001 - the response is out; a lost refund only errs strict
                    logger.warning("could not settle the token charge of %s", charge.key_id, exc_info=True)
        rids = getattr(state, "owned_rids", None)
        if rids:
            try:
                await self.owners.remove(rids)
            except Exception:  # noqa: BLE001
                logger.warning("could not forget rids %s", rids[:4], exc_info=True)

    # -- content filters -------------------------------------------------------------------------

    async def filter_input(self, key: ApiKey | None, texts: list[str], param: str) -> None:
        if not self.inputs or not _filtered(key) or not texts:
            return
        try:
            verdict = await self.inputs.check(texts)
        except FilterFailure as exc:
            self._on_failure(exc)
            return
        if verdict is not None:
            logger.info("prompt refused by %s (%s: %s)", verdict.filter, verdict.category, verdict.reason)
            raise ContentFilterError(
                f"the prompt was refused by the content filter ({verdict.category})",
                param=param, code="content_filter")

    def _on_failure(self, exc: FilterFailure) -> None:
        safety = self.settings.safety
        if safety.on_error == "open":
            logger.warning("content filter failed, letting the text through: %s", exc)
            return
        raise OverloadedError(f"{exc}; the request was not served (content filtering fails closed)",
                              code="content_filter_unavailable", retry_after_s=safety.retry_after_s)

    async def check_output(self, text: str) -> Verdict | None:
        try:
            return await self.outputs.check([text[-self.settings.safety.output_window_chars:]])
        except FilterFailure as exc:
            self._on_failure(exc)
            return None

    # -- tokens a request may use ----------------------------------------------------------------

    async def count_tokens(self, texts: list[str]) -> int:
        if self.tokenizer is None:
            return sum(len(t.encode("utf-8")) // 4 + 1 for t in texts)  # ~4 bytes a token
        return await self.off_loop.call(  # long prompts off the event loop (app/ingress/prepare.py)
            sum(len(t) for t in texts), lambda: sum(len(self.tokenizer.encode(t)) for t in texts))


def _filtered(key: ApiKey | None) -> bool:
    return key is None or key.content_filter


# -- the process's guard ---------------------------------------------------------------------------

_guard: Guard | None = None


def configure(settings: Any, tokenizer: Any = None) -> Guard:
    """Call once in the Ingress constructor."""
    from app.logs import configure_log_redaction

    global _guard
    _guard = Guard(settings, tokenizer)
    configure_log_redaction(settings.safety.redact_pii_in_logs)
    return _guard


def current() -> Guard | None:
    return _guard


# -- route scopes (middleware) ---------------------------------------------------------------------


def app_routes(app: Any) -> list[tuple[str, set[str] | None]]:
    """Every route of the app as (path template, methods), included routers flattened (FastAPI
    keeps an included router as one entry holding the original router and its prefix)."""

    def walk(routes: list[Any], prefix: str) -> list[tuple[str, set[str] | None]]:
        found = []
        for route in routes:
            inner = getattr(route, "original_router", None)
            if inner is not None:
                found += walk(inner.routes, prefix + (getattr(route.include_context, "prefix", "") or ""))
            elif hasattr(route, "routes") and not hasattr(route, "methods"):  # a Mount
                found.append((prefix + route.path, None))
            else:
                found.append((prefix + route.path, getattr(route, "methods", None)))
        return found

    return walk(list(app.routes), "")


_ROUTE_TABLES: dict[int, list[tuple[str, Any]]] = {}


def route_template(app: Any, scope: dict) -> str | None:
    """The path template of the route that will serve this request (None: no route, a 404)."""
    table = _ROUTE_TABLES.get(id(app))
    if table is None:
        table = _ROUTE_TABLES[id(app)] = [
            (path, compile_path(path)[0] if methods is not None else None) for path, methods in app_routes(app)
        ]
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    for template, regex in table:
        if (regex.match(path) if regex is not None else path.startswith(template)):
            return template
    return None


def authorize_route(app: Any, request: Request, public_paths: list[str]) -> APIError | None:
    """403 if the authenticated key lacks the scope of the route it asks for."""
    path = route_template(app, request.scope)
    if path is None:
        return None
    scope = required_scope(path, public_paths)
    request.state.route_scope = scope
    if scope == PUBLIC:
        return None
    try:
        authorize(getattr(request.state, "api_key", None), scope, path)
    except APIError as error:
        return error
    return None


def is_admin(request: Request) -> bool:
    key: ApiKey | None = getattr(request.state, "api_key", None)
    current_auth_off = key is None  # no keys configured: the server is open, as before scopes
    return current_auth_off or key.has_scope(ADMIN)


def response_headers(request_state: Any) -> list[tuple[bytes, bytes]]:
    headers = getattr(request_state, "ratelimit_headers", None) or {}
    return [(k.lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in headers.items()]


# -- the route dependency --------------------------------------------------------------------------


async def guard_request(request: Request) -> None:
    """Runs before every API route handler (see the module doc)."""
    guard = _guard
    if guard is None or not guard.active:
        return
    path = route_template(request.app, request.scope) or ""
    if required_scope(path, guard.settings.security.public_paths) == PUBLIC:
        return
    key: ApiKey | None = getattr(request.state, "api_key", None)
    limits = guard.limits_for(key)
    check_abort = path == "/abort_request" and not is_admin(request)
    # /v1/moderations runs the filters itself and reports: it never refuses.
    filter_input = bool(guard.inputs) and _filtered(key) and path in PROMPT_PARAM and path != "/v1/moderations"
    count_tokens = limits is not None and limits.tokens_per_minute is not None
    # The body is parsed a second time (FastAPI parsed it for the route) only when a check needs it.
    body = await _json_body(request) if (check_abort or filter_input or count_tokens) else None
    if check_abort:
        await _check_abort(guard, key, body)
    texts, ids_tokens, max_output = request_texts(path, body, guard.settings) if body is not None else ([], 0, 0)
    if limits is not None:
        tokens = await guard.count_tokens(texts) + ids_tokens + max_output if count_tokens else 0
        await guard.rate_limit(request, key, tokens)
    if filter_input:
        await guard.filter_input(key, texts, PROMPT_PARAM[path])


async def _json_body(request: Request) -> Any:
    if request.method not in ("POST", "PUT", "PATCH"):
        return None
    try:
        return json.loads(await request.body() or b"null")
    except ValueError:
        return None  # the route's own validation answers 400


async def _check_abort(guard: Guard, key: ApiKey | None, body: Any) -> None:
    body = body if isinstance(body, dict) else {}
    if body.get("abort_all"):
        raise PermissionDeniedError("abort_all needs the 'admin' scope", param="abort_all", code="insufficient_scope")
    rid = body.get("rid")
    if isinstance(rid, str) and rid and key is not None and not await guard.owners.owns(rid, key.id):
        raise NotFoundError(f"no in-flight request '{rid[:128]}' was sent with this API key",
                            param="rid", code="request_not_found")


# The routes whose body holds a prompt, and the field an error names.
PROMPT_PARAM = {"/v1/chat/completions": "messages", "/v1/completions": "prompt", "/generate": "text",
                "/run": "program", "/v1/moderations": "input"}


# -- what a request asks for: its texts and its most output tokens ---------------------------------


def _strings(value: Any) -> list[str]:
    """Every string inside a JSON value (prompts, message parts, program ops)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    return []


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default


def _id_lists(value: Any) -> list[list[int]]:
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, list) and all(isinstance(x, int) for x in v)]
    return []


def request_texts(path: str, body: Any, settings: Any) -> tuple[list[str], int, int]:
    """(texts to filter and count, tokens given as ids, most output tokens) of a request body."""
    if not isinstance(body, dict):
        return [], 0, 0
    if path == "/v1/chat/completions":
        texts = []
        for m in body.get("messages") or []:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, str):
                texts.append(content)
            elif isinstance(content, list):  # content parts: only the text ones carry a prompt
                texts += [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        wanted = body.get("max_completion_tokens") or body.get("max_tokens")
        return texts, 0, _int(wanted, settings.ingress.default_max_tokens) * _int(body.get("n"), 1)
    if path == "/v1/completions":
        prompt = body.get("prompt")
        ids = _id_lists(prompt)
        texts = [p for p in (prompt if isinstance(prompt, list) else [prompt]) if isinstance(p, str)]
        count = max(1, len(texts) + len(ids))
        return texts, sum(map(len, ids)), _int(body.get("max_tokens"), 16) * _int(body.get("n"), 1) * count
    if path == "/generate":
        texts = _strings(body.get("text"))
        ids = _id_lists(body.get("input_ids"))
        sampling = body.get("sampling_params")
        samplings = sampling if isinstance(sampling, list) else [sampling] * max(1, len(texts) + len(ids))
        most = sum(_int((s or {}).get("max_new_tokens"), 128) * _int((s or {}).get("n"), 1)
                   for s in samplings if isinstance(s, dict) or s is None)
        return texts, sum(map(len, ids)), most
    if path == "/run":
        return _strings(body.get("program")) + _strings(body.get("arguments")), 0, settings.ingress.default_max_tokens
    if path == "/v1/moderations":
        return _strings(body.get("input")), 0, 0
    return [], 0, 0


# -- ownership and output filtering (called by the route handlers) ---------------------------------


async def remember(request: Request, requests: list[GenerateRequest]) -> None:
    """Record that the calling key owns these sequences (for its aborts)."""
    key: ApiKey | None = getattr(request.state, "api_key", None)
    if _guard is None or key is None:
        return
    rids = [r.rid for r in requests]
    await _guard.owners.add(rids, key.id)
    request.state.owned_rids = rids


def _output_filtering(request: Request) -> Guard | None:
    guard = _guard
    if guard is None or not guard.outputs or not _filtered(getattr(request.state, "api_key", None)):
        return None
    return guard


def _stopped(out: GenerateOutput, verdict: Verdict) -> GenerateOutput:
    return out.model_copy(update={
        "text": "", "token_ids": [], "text_lens": None, "finished": True, "output_token_logprobs": None,
        "output_top_logprobs": None,
        "finish_reason": FinishReason(type="content_filter", message=f"{verdict.category}: {verdict.reason}"[:200]),
    })


class _GrowingTexts:
    """Streamed texts, one per key (a sequence, a /run branch), checked by the output filters each
    time one has grown by `output_check_chars` since its last check, and when it ends."""

    def __init__(self, guard: Any):
        self.guard = guard
        self.every = guard.settings.safety.output_check_chars
        self.texts: dict[Any, str] = {}
        self.checked: dict[Any, int] = {}

    async def add(self, key: Any, piece: str, final: bool = False) -> Verdict | None:
        text = self.texts[key] = self.texts.get(key, "") + piece
        if piece and (len(text) - self.checked.get(key, 0) >= self.every or final):
            self.checked[key] = len(text)
            return await self.guard.check_output(text)
        return None


async def filter_stream(request: Request, stream: AsyncIterator[tuple[int, GenerateOutput]],
                        count: int) -> AsyncIterator[tuple[int, GenerateOutput]]:
    """Pass a stream of (index, increment) through the output filters: a sequence whose text gets
    flagged ends there with finish_reason content_filter (the flagged increment is withheld); when
    every sequence has ended the upstream stream is closed, which cancels the generation."""
    guard = _output_filtering(request)
    if guard is None:
        async for item in stream:
            yield item
        return
    growing = _GrowingTexts(guard)
    ended: set[int] = set()
    async for index, out in stream:
        if index in ended:
            continue
        verdict = await growing.add(index, out.text, out.finished)
        if verdict is not None:
            ended.add(index)
            yield index, _stopped(out, verdict)
            if len(ended) >= count:
                return
            continue
        if out.finished:
            ended.add(index)
        yield index, out


async def filter_outputs(request: Request, outputs: list[GenerateOutput]) -> list[GenerateOutput]:
    """Whole outputs through the output filters; a flagged one loses its text and finishes with
    finish_reason content_filter."""
    guard = _output_filtering(request)
    if guard is None:
        return outputs
    checked = []
    for out in outputs:
        verdict = await guard.check_output(out.text) if out.text else None
        checked.append(out if verdict is None else _stopped(out, verdict))
    return checked


# -- /run programs: the same output filters over the program's text ---------------------------------


def _run_stopped(result: dict[str, Any], verdict: Verdict) -> dict[str, Any]:
    """A /run result whose text a filter flagged: text and variables withheld, and why."""
    return {**result, "text": "", "variables": {},
            "finish_reason": {"type": "content_filter", "message": f"{verdict.category}: {verdict.reason}"[:200]}}


def _run_texts(result: dict[str, Any]) -> list[str]:
    """What a /run result shows: its text and its string variables (a fork's gens, joined lists)."""
    texts = [result.get("text") or ""]
    for value in (result.get("variables") or {}).values():
        values = value if isinstance(value, list) else [value]
        texts += [v for v in values if isinstance(v, str) and v]
    return [t for t in texts if t]


async def filter_run_result(request: Request, result: dict[str, Any]) -> dict[str, Any]:
    """A whole /run result through the output filters."""
    guard = _output_filtering(request)
    if guard is None:
        return result
    for text in _run_texts(result):
        verdict = await guard.check_output(text)
        if verdict is not None:
            return _run_stopped(result, verdict)
    return result


async def filter_run_stream(request: Request, events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    """A streamed /run's events through the output filters: each branch's text is checked as it
    grows (every `output_check_chars`), the final result as a whole. A flagged program ends with a
    `done` event whose result is withheld (finish_reason content_filter; the flagged text event is
    not sent), and the upstream stream is closed, which cancels the program."""
    guard = _output_filtering(request)
    if guard is None:
        async for event in events:
            yield event
        return
    growing = _GrowingTexts(guard)
    try:
        async for event in events:
            if event.get("type") == "text" and event.get("text"):
                verdict = await growing.add(tuple(event.get("branch") or ()), event["text"])
                if verdict is not None:
                    yield {"type": "done", "result": _run_stopped({"text": "", "variables": {}, "meta": {}}, verdict)}
                    return
            elif event.get("type") == "done" and isinstance(event.get("result"), dict):
                event = {**event, "result": await filter_run_result(request, event["result"])}
            yield event
    finally:
        close = getattr(events, "aclose", None)
        if close is not None:
            await close()


def server_info_view(request: Request, info: dict[str, Any]) -> dict[str, Any]:
    """What /server_info shows: everything to admins (secrets masked), the model's public facts to
    other keys (internal state: replicas, scheduler, settings, stay hidden)."""
    if not is_admin(request):
        return {k: info[k] for k in ("model_path", "context_length", "version") if k in info} | {
            "served_model_name": (info.get("model") or {}).get("served_model_name") or info.get("model_path")}
    shown = json.loads(json.dumps(info, default=str))
    for key in (shown.get("security") or {}).get("api_keys") or []:
        if key.get("key_sha256"):
            key["key_sha256"] = "***"
    limits = shown.get("rate_limits") or {}
    if isinstance(limits.get("redis_url"), str) and "@" in limits["redis_url"]:
        scheme, _, rest = limits["redis_url"].partition("://")
        limits["redis_url"] = f"{scheme}://***@{rest.rpartition('@')[2]}"
    shown["ingress_replica"] = _replica_id()
    return shown


def _replica_id() -> str | None:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside Serve (unit tests)
        return None
