"""sglserve's Python SDK: `Client` (blocking) and `AsyncClient` (asyncio).

    from sglserve.client import Client
    client = Client("http://localhost:8000")          # API key: argument or SGLSERVE_API_KEY
    print(client.chat("Hello!", max_tokens=16).text)
    for piece in client.chat("Hello!", stream=True):
        print(piece.text, end="")

Depends on httpx and pydantic only: no torch, no ray, no server code.
"""

from ._core import RetryPolicy
from .aio import AsyncClient, AsyncStream
from .errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    GatewayTimeoutError,
    InternalServerError,
    JobFailedError,
    JobTimeoutError,
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    ScriptError,
    ScriptSyntaxError,
    SGLServeError,
    UnprocessableEntityError,
    WebhookVerificationError,
)
from .sync import Client, Stream
from .types import (
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChunk,
    GenerateChunk,
    GenerateResult,
    Job,
    Model,
    RunEvent,
    RunResult,
)
from .webhooks import verify_callback

SGLangClient = Client  # the name the product brief's example uses

__all__ = [
    name for name, value in dict(globals()).items()
    if not name.startswith("_") and getattr(value, "__module__", "").startswith("sglserve.client")
]
