"""The HTTP ingress deployment: FastAPI app, error rendering, liveness/readiness, routers.

Every error leaves as `{"error": {"message", "type", "param", "code"}}` with its status: a body
that is not JSON -> 400; a field of the wrong type or out of range -> 422 naming the field
(`messages[0].role`); our own APIErrors keep their status and headers (503 + Retry-After).
"""

import json
import logging
import os
import time
import uuid
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.config import AppSettings
from app.errors import APIError, NotFoundError, OverloadedError, PayloadTooLargeError, unwrap_error
from app.ingress import guard
from app.ingress.gateway import Gateway, ModelLimits
from app.ingress.moderation_api import moderation_router
from app.security import Authenticator
from app.ingress.native_api import native_router
from app.ingress.openai_api import openai_router
from app.ingress.run_api import run_router
from app.ingress.playground_api import is_browser_path, playground_router
from app.ingress.batch_api import batch_router
from app.ingress.jobs_api import job_service, jobs_router
from app.jobs.conversion import JobConversion
from app.logs import configure_ingress_observability, start_request_trace
from app.sigterm import SigtermDrain

logger = logging.getLogger("sglserve.ingress")
MODEL_VERSION_RESPONSE_HEADER = b"x-sglserve-model-version"

# guard_request: rate limits, input filters, abort ownership, before every API route (app/ingress/guard.py)
api = FastAPI(title="sglserve", docs_url="/docs", redoc_url=None, dependencies=[Depends(guard.guard_request)])


# SIGTERM straight to this process: refuse new requests (503, retryable), finish the ones held
# (streams included), then exit; Serve starts a replacement (app/sigterm.py).
DRAIN = SigtermDrain("Ingress")


class _Current:
    """The process's Gateway. Serve pickles the FastAPI app into the replica, so state set on the
    module's `api` object would not be the served app's: keep it in a module-level holder."""

    gateway: Gateway | None = None
    auth: Authenticator | None = None


def gateway_of(request: Request) -> Gateway:
    gateway = _Current.gateway
    if gateway is None:
        raise APIError("the server is still starting", status_code=503, code="starting")
    return gateway


api.include_router(openai_router(gateway_of))
api.include_router(native_router(gateway_of))
api.include_router(run_router(gateway_of))
api.include_router(playground_router(gateway_of, lambda: _Current.auth))
api.include_router(moderation_router())
api.include_router(jobs_router(gateway_of))
api.include_router(batch_router(gateway_of))


# -- errors ----------------------------------------------------------------------------------------


def _error_response(error: APIError, request: Request | None = None) -> JSONResponse:
    headers = dict(error.headers)
    return JSONResponse(error.to_body(), status_code=error.status_code, headers=headers)


def _field_path(loc: tuple[Any, ...]) -> str:
    """('body', 'messages', 0, 'role') -> 'messages[0].role'."""
    path = ""
    for i, part in enumerate(loc):
        if i == 0 and part == "body":  # FastAPI's own prefix (a job's body names its field "body")
            continue
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += ("." if path else "") + str(part)
    return path


@api.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return _error_response(exc, request)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": "value_error"}
    if first.get("type") == "json_invalid":
        error = APIError(
            f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}",
            status_code=400,
            code="invalid_json",
        )
        error.error_type = "invalid_request_error"
        return _error_response(error, request)
    # Union types report one error per alternative; name the field once, list what was wrong.
    param = _field_path(tuple(first.get("loc", ())))
    messages = sorted({e.get("msg", "") for e in errors if _field_path(tuple(e.get("loc", ()))).startswith(param.split("[")[0])})
    detail = "; ".join(m for m in messages if m)[:500] or "invalid value"
    error = APIError(
        f"invalid value for '{param or 'body'}': {detail}", status_code=422, param=param or None, code="invalid_value"
    )
    error.error_type = "invalid_request_error"
    return _error_response(error, request)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 404:
        error: APIError = NotFoundError(f"no route {request.method} {request.url.path}", code="route_not_found")
    else:
        error = APIError(str(exc.detail), status_code=exc.status_code)
        error.error_type = "invalid_request_error"
    return _error_response(error, request)


@api.exception_handler(Exception)
async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    cause = unwrap_error(exc)
    if isinstance(cause, APIError):
        return _error_response(cause, request)
    logger.exception("unhandled error on %s", request.url.path)
    return _error_response(APIError(f"internal error: {type(cause).__name__}: {cause}"), request)


# -- request middleware ----------------------------------------------------------------------------


class RequestContext:
    """Request id, API-key auth, body-size limit, metrics and the request log, around every request.

    A plain ASGI middleware, not Starlette's BaseHTTPMiddleware: that one runs the app in a second
    task and passes every streamed body chunk through an in-memory channel between the two, a cost
    paid per SSE event on the hot path. Here the app runs in the request's own task and `send` is
    only watched (status, and whether the last body chunk went out)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        # Serve's proxy accepts X-Request-Id (or makes one) and returns it on the response itself.
        request.state.request_id = request.headers.get("x-request-id") or _serve_request_id()
        request.state.started = time.monotonic()
        trace = start_request_trace(request)  # metrics + one JSON log line per request (app.logs)
        refusal = self._refusal(request)
        if refusal is not None:
            await trace.finish(_error_response(refusal, request))(scope, receive, send)
            return
        with DRAIN.holding():
            await self._serve(scope, receive, send, request, trace)

    async def _serve(self, scope: dict, receive: Any, send: Any, request: Request, trace: Any) -> None:
        outcome = {"status": 500, "complete": False}

        async def watched_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                outcome["status"] = message["status"]
                extra = guard.response_headers(request.state)  # x-ratelimit-* on every response
                version = getattr(request.state, "model_version", None)  # canary: which version answered
                if version is not None:
                    extra = [*extra, (MODEL_VERSION_RESPONSE_HEADER, version.encode("latin-1"))]
                if extra:
                    message = {**message, "headers": [*message.get("headers", []), *extra]}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                outcome["complete"] = True
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        finally:
            trace.complete(outcome["status"], disconnected=not outcome["complete"])
            if guard.current() is not None:
                await guard.current().settle(request, trace.sequences, outcome["status"])

    @staticmethod
    def _refusal(request: Request) -> APIError | None:
        """Why the request is refused before it reaches a route (draining after SIGTERM, too large,
        no valid key), if it is; an accepted API key is recorded on `request.state` (tenant,
        priorities) on the way."""
        if DRAIN.draining and _route_path(request) != "/health":
            return OverloadedError("this ingress replica is shutting down (SIGTERM); retry",
                                   code="ingress_draining", retry_after_s=1)
        gateway = _Current.gateway
        limit = gateway.settings.ingress.max_request_bytes if gateway else 4 * 1024 * 1024
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return PayloadTooLargeError(f"the request body has {length} bytes; the limit is {limit}")
        auth = _Current.auth
        path = _route_path(request)
        # The playground's page and files are public; its /stream checks a signed token itself.
        if auth is not None and auth.requires_key(path) and not is_browser_path(path):
            try:
                key = auth.authenticate(request.headers.get("authorization"), request.headers.get("x-api-key"))
            except APIError as error:
                return error
            request.state.key_id = request.state.tenant = key.id
            request.state.priority = key.priority
            request.state.max_priority = key.max_priority
            request.state.api_key = key
            return guard.authorize_route(api, request, auth.settings.public_paths)  # key scopes
        return None


# Inside RequestContext (added after it = outside it): the caller is authenticated first.
api.add_middleware(JobConversion, service_of=lambda: job_service(_Current.gateway))
api.add_middleware(RequestContext)


def _route_path(request: Request) -> str:
    """The path below the application's route prefix (Serve mounts apps under root_path)."""
    path, root = request.scope.get("path", ""), request.scope.get("root_path", "")
    return path[len(root):] or "/" if root and path.startswith(root) else path


def _serve_request_id() -> str:
    try:
        from ray.serve.context import _get_serve_request_context

        return _get_serve_request_context().request_id or uuid.uuid4().hex
    except Exception:  # noqa: BLE001 - outside a Serve request (unit tests)
        return uuid.uuid4().hex


# -- liveness and readiness ------------------------------------------------------------------------


@api.get("/health")
async def health() -> JSONResponse:
    """Liveness: the HTTP ingress answers. Says nothing about the model (see /ready)."""
    return JSONResponse({"status": "ok"})


@api.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """Readiness: a real 1-token generation through the scheduler and a replica, bounded in time."""
    gateway = gateway_of(request)
    timeout_s = gateway.settings.ingress.ready_timeout_s
    try:
        probe = await gateway.scheduler.check_ready.remote(timeout_s)
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        cause = unwrap_error(exc)
        return JSONResponse(
            {"status": "not_ready", "reason": f"{type(cause).__name__}: {cause}"[:300]}, status_code=503
        )
    return JSONResponse({"status": "ready", **probe})


# -- the deployment --------------------------------------------------------------------------------


def load_model_limits(settings: AppSettings) -> tuple[ModelLimits, Any]:
    from transformers import AutoConfig

    from app.engines.hf_tokenizer import HFTokenizer
    from app.engines.tiny_model import resolve_model_path

    path = resolve_model_path(settings.model)
    config = AutoConfig.from_pretrained(path, trust_remote_code=settings.model.trust_remote_code)
    tokenizer = HFTokenizer.from_settings(settings.model)
    context = settings.model.context_length or getattr(config, "max_position_embeddings", 4096)
    limits = ModelLimits(
        name=settings.model.name,
        model_path=settings.model.model_path,
        context_length=int(context),
        vocab_size=int(config.vocab_size),
    )
    return limits, tokenizer


@serve.ingress(api)
class Ingress:
    def __init__(self, scheduler: DeploymentHandle, settings: dict[str, Any],
                 replicas: DeploymentHandle | dict[str, DeploymentHandle],  # {version: handle} with `models:`
                 job_runner: DeploymentHandle | None = None):  # bound so that Serve deploys it
        app_settings = AppSettings.from_args(settings)
        limits, tokenizer = load_model_limits(app_settings)
        configure_ingress_observability(limits.name, app_settings.observability)
        # `replicas`: tokens stream from the replica a ticket names, not through the scheduler.
        _Current.gateway = Gateway(app_settings, scheduler, tokenizer, limits, replicas)
        _Current.auth = Authenticator(app_settings.security) if app_settings.security.enabled else None
        guard.configure(app_settings, tokenizer)
        logger.info("ingress ready for model %s", json.dumps(limits.name))

    def process_info(self) -> dict[str, Any]:
        """This replica's process and its SIGTERM drain (tests/chaos signal the process)."""
        return {"pid": os.getpid(), "draining": DRAIN.draining, "busy": DRAIN.busy}

    def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        """Serve's lightweight update: `user_config: {weights: {version: weight}}` on the Ingress
        deployment moves canary traffic in place (no replica of any deployment restarts).

        Bad weights (an unknown version, all zero) fail the replica's start, so a deploy with them
        fails visibly; on a live replica they are logged and the current weights kept, since a
        reconfigure that raises makes Serve replace the replica, and a typo must not take the
        Ingress down."""
        try:
            weights = _user_weights(user_config)
            if weights is not None and _Current.gateway is not None:
                _Current.gateway.reweight(weights)
                logger.info("canary weights now %s", json.dumps(weights, sort_keys=True))
        except ValueError:
            if not getattr(self, "_reconfigured", False):
                raise
            logger.exception("Ingress user_config refused; the current canary weights stay")
        self._reconfigured = True


def _user_weights(user_config: dict[str, Any] | None) -> dict[str, float] | None:
    unknown = set(user_config or {}) - {"weights"}
    if unknown:
        raise ValueError(f"unknown Ingress user_config keys {sorted(unknown)}; known: ['weights']")
    weights = (user_config or {}).get("weights")
    if weights is None:
        return None
    if not isinstance(weights, dict):
        raise ValueError("Ingress user_config.weights must map version names to weights")
    return {str(k): float(v) for k, v in weights.items()}


IngressDeployment = serve.deployment(name="Ingress", max_ongoing_requests=1024)(Ingress)
