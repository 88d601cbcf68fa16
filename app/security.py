"""API keys: who is calling, what it may do (scopes), with which default priority, fairness weight
and rate limit.

Keys are configured in `serve_config.yaml` (`args.security.api_keys`) by id, never logged: a
config holds either the key's SHA-256 (`key_sha256`, preferred) or the name of an environment
variable that holds the key (`key_env`). When at least one key is configured, every route except
the public ones (liveness, readiness) needs `Authorization: Bearer <key>` (or `X-API-Key`); the
key's id becomes the request's tenant (fairness) and names it in logs and metrics.

Authorization: a key holds scopes (`inference`, `admin`; `inference` by default, as SGLang keeps
a separate admin API key). `ROUTE_SCOPES` below is THE list of which route needs which scope;
a route missing from it needs `admin` (closed by default), and tests/security's auth matrix fails
until the route is listed there.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.errors import AuthenticationError, PermissionDeniedError
from app.ratelimit import RateLimit

Scope = Literal["inference", "admin"]
PUBLIC, INFERENCE, ADMIN = "public", "inference", "admin"
# Browser routes that cannot send headers authenticate with a short-lived signed token instead
# of a key (app/ingress/playground_api.py checks it): no key opens them, none is needed.
STREAM_TOKEN = "stream_token"

# Every route and the scope it needs, in ONE place (by the route's path template). `inference`
# routes are the model's; `admin` ones act on the whole server (every replica, every tenant).
# Two inference routes show more to admins: /server_info (internal state: replicas, scheduler,
# settings) and /abort_request (a non-admin key may abort only requests it sent itself, and never
# `abort_all`); app/ingress/guard.py applies both rules.
ROUTE_SCOPES: dict[str, str] = {
    "/health": PUBLIC,
    "/ready": PUBLIC,
    "/docs": PUBLIC,
    "/docs/oauth2-redirect": PUBLIC,
    "/openapi.json": PUBLIC,
    "/v1/models": INFERENCE,
    "/v1/chat/completions": INFERENCE,
    "/v1/completions": INFERENCE,
    "/v1/moderations": INFERENCE,
    "/generate": INFERENCE,
    "/run": INFERENCE,
    "/get_model_info": INFERENCE,
    "/health_generate": INFERENCE,  # runs a generation: not free, so not public
    "/server_info": INFERENCE,  # non-admin keys see the public part only
    "/get_server_info": INFERENCE,
    "/abort_request": INFERENCE,  # own requests only; others' and abort_all: admin
    "/flush_cache": ADMIN,  # every replica's prefix cache, all tenants
    "/": PUBLIC,  # the playground page and its files (app/static)
    "/static/{name}": PUBLIC,
    "/v1/stream_tokens": INFERENCE,  # mints a token for the caller's own key
    "/stream": STREAM_TOKEN,
    # Jobs and OpenAI's Batch API: each key sees only its own (404 for another's).
    "/v1/jobs": INFERENCE,
    "/v1/jobs/{job_id}": INFERENCE,
    "/v1/jobs/{job_id}/cancel": INFERENCE,
    "/v1/files": INFERENCE,
    "/v1/files/{file_id}": INFERENCE,
    "/v1/files/{file_id}/content": INFERENCE,
    "/v1/batches": INFERENCE,
    "/v1/batches/{batch_id}": INFERENCE,
    "/v1/batches/{batch_id}/cancel": INFERENCE,
}


def required_scope(route_path: str, public_paths: list[str] | None = None) -> str:
    """The scope a route needs; unlisted routes need admin (closed by default)."""
    if public_paths and route_path in public_paths:
        return PUBLIC
    return ROUTE_SCOPES.get(route_path, ADMIN)


class ApiKey(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    key_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    key_env: str | None = None  # environment variable holding the key itself
    priority: int = 0  # default priority of this key's requests
    max_priority: int | None = None  # ceiling on the priority a request may ask for
    weight: float = Field(1.0, gt=0)  # fair-share weight against other keys
    scopes: list[Scope] = Field(default_factory=lambda: ["inference"])
    rate_limit: RateLimit | None = None  # None: `rate_limits.default` (or no limit)
    content_filter: bool = True  # False: a trusted tenant's requests skip the safety filters

    def has_scope(self, scope: str) -> bool:
        return scope == PUBLIC or scope in self.scopes or "admin" in self.scopes

    @model_validator(mode="after")
    def _one_secret(self) -> "ApiKey":
        if (self.key_sha256 is None) == (self.key_env is None):
            raise ValueError(f"api key '{self.id}': give exactly one of key_sha256 and key_env")
        return self

    def digest(self) -> str | None:
        if self.key_sha256 is not None:
            return self.key_sha256
        value = os.environ.get(self.key_env or "")
        return hash_key(value) if value else None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class SecuritySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    api_keys: list[ApiKey] = Field(default_factory=list)
    public_paths: list[str] = Field(default_factory=lambda: ["/health", "/ready", "/docs", "/openapi.json"])

    @property
    def enabled(self) -> bool:
        return bool(self.api_keys)

    def default_priorities(self) -> dict[str, int]:
        return {k.id: k.priority for k in self.api_keys if k.priority}

    def tenant_weights(self) -> dict[str, float]:
        return {k.id: k.weight for k in self.api_keys if k.weight != 1.0}


class Authenticator:
    """Checks a presented key against the configured digests in constant time."""

    def __init__(self, settings: SecuritySettings):
        self.settings = settings
        self._keys = [(k, k.digest()) for k in settings.api_keys]

    def requires_key(self, path: str) -> bool:
        return self.settings.enabled and required_scope(path, self.settings.public_paths) != PUBLIC

    def authenticate(self, authorization: str | None, x_api_key: str | None) -> ApiKey:
        presented = x_api_key
        if authorization:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                raise AuthenticationError(
                    "the Authorization header must be 'Bearer <api key>'", code="invalid_authorization"
                )
            presented = value.strip()
        if not presented:
            raise AuthenticationError(
                "an API key is required: send 'Authorization: Bearer <api key>'", code="missing_api_key"
            )
        digest = hash_key(presented)
        match = None
        for key, expected in self._keys:
            if expected is not None and hmac.compare_digest(digest, expected):
                match = key
        if match is None:
            raise AuthenticationError("the API key is not valid", code="invalid_api_key")
        return match


def authorize(key: ApiKey | None, scope: str, route_path: str) -> None:
    """403 unless `key` holds `scope`. `key` None means authentication is off (no keys configured):
    everything is allowed, as before scopes existed."""
    if key is None or key.has_scope(scope):
        return
    raise PermissionDeniedError(
        f"the API key '{key.id}' lacks the '{scope}' scope needed for {route_path}",
        code="insufficient_scope",
    )
