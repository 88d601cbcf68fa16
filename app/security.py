"""API keys: who is calling, with which default priority and fairness weight.

Keys are configured in `serve_config.yaml` (`args.security.api_keys`) by id, never logged: a
config holds either the key's SHA-256 (`key_sha256`, preferred) or the name of an environment
variable that holds the key (`key_env`). When at least one key is configured, every route except
the public ones (liveness, readiness) needs `Authorization: Bearer <key>` (or `X-API-Key`); the
key's id becomes the request's tenant (fairness) and names it in logs and metrics.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.errors import AuthenticationError


class ApiKey(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    key_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    key_env: str | None = None  # environment variable holding the key itself
    priority: int = 0  # default priority of this key's requests
    max_priority: int | None = None  # ceiling on the priority a request may ask for
    weight: float = Field(1.0, gt=0)  # fair-share weight against other keys

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
        return self.settings.enabled and path not in self.settings.public_paths

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
