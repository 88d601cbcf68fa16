"""The SDK's calls, written once. `Client` and `AsyncClient` inherit them and differ only in how
`_call` runs a `Call`: the blocking client returns the answer, the async one an awaitable of it.
"""

from __future__ import annotations

from typing import Any

import httpx

from . import _core
from ._core import Call, RetryPolicy


class ClientMethods:
    """Every call of the API; see `Client` for examples."""

    def __init__(self, base_url: str | None, api_key: str | None, model: str | None,
                 retry: RetryPolicy | None, max_retries: int, job_wait_timeout_s: float | None):
        self.base_url = _core.resolve_base_url(base_url)
        self.api_key = _core.resolve_api_key(api_key)
        self.model = model
        self.retry = retry or RetryPolicy(max_retries=max_retries)
        self.job_wait_timeout_s = job_wait_timeout_s

    def _http_options(self, timeout_s: float, connect_timeout_s: float, headers: dict[str, str] | None,
                      transport: Any) -> dict[str, Any]:
        return {
            "base_url": self.base_url,
            "headers": _core.default_headers(self.api_key, headers),
            "timeout": httpx.Timeout(timeout_s, connect=connect_timeout_s),
            "transport": transport,
        }

    def _call(self, call: Call) -> Any:  # pragma: no cover - each client defines it
        raise NotImplementedError

    # -- generation --------------------------------------------------------------------------

    def chat(self, messages: Any, *, model: str | None = None, stream: bool = False,
             system: str | None = None, **params: Any) -> Any:
        """Chat completion. `messages`: a string (one user turn) or OpenAI's message list;
        `params`: any OpenAI/SGLang field (max_tokens, temperature, stop, ...). Without a model
        (here or on the client), the server's first model is used."""
        return self._call(_core.chat_call(model or self.model, messages, stream, system, params))

    def complete(self, prompt: Any, *, model: str | None = None, stream: bool = False, **params: Any) -> Any:
        """Text completion (OpenAI's /v1/completions)."""
        return self._call(_core.complete_call(model or self.model, prompt, stream, params))

    def generate(self, text: Any, *, stream: bool = False, sampling_params: dict[str, Any] | None = None,
                 **params: Any) -> Any:
        """SGLang's native /generate. Streamed increments carry only the new text."""
        return self._call(_core.generate_call(text, stream, sampling_params, params))

    def run(self, script: Any, *, stream: bool = False, sampling: dict[str, Any] | None = None,
            arguments: dict[str, Any] | None = None, **variables: Any) -> Any:
        """Run a whole program with /run; keyword arguments become its variables (use
        `arguments=` for names that clash with this method's own)."""
        return self._call(_core.run_call(script, stream, {**(arguments or {}), **variables}, sampling))

    # -- information -------------------------------------------------------------------------

    def models(self) -> Any:
        """The served models (`list[Model]`)."""
        return self._call(_core.models_call())

    def health(self) -> Any:
        return self._call(_core.get_call("/health"))

    def ready(self) -> Any:
        return self._call(_core.get_call("/ready"))

    def server_info(self) -> Any:
        return self._call(_core.get_call("/server_info"))

    def stream_token(self) -> Any:
        """A short-lived signed token for `GET /stream` (browsers' EventSource)."""
        return self._call(_core.stream_token_call())

    # -- jobs --------------------------------------------------------------------------------

    def submit(self, path: str, body: dict[str, Any], *, callback_url: str | None = None,
               max_wait_s: float | None = None) -> Any:
        """Submit a request as an asynchronous job (POST /v1/jobs); answers the `Job`."""
        return self._call(_core.submit_call(path, body, callback_url, max_wait_s))

    def job(self, job_id: str) -> Any:
        return self._call(_core.job_call(job_id))

    def cancel_job(self, job_id: str) -> Any:
        return self._call(_core.cancel_job_call(job_id))
