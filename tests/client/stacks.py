"""What the client and browser tests share: the SDK on the path, and an application with an API key.

The SDK is its own distribution (`client/`); when it is not installed, the tests import it from
the repository. The keyed application is deployed once per session, whichever test asks first.
"""

from __future__ import annotations

import sys
from pathlib import Path

CLIENT_DIR = Path(__file__).resolve().parents[2] / "client"
API_KEY = "sk-test-issue18"
KEYED_APP, KEYED_PREFIX = "keyed", "/keyed"
_deployed: dict[str, object] = {}

try:
    import sglserve.client  # noqa: F401
except ImportError:
    sys.path.insert(0, str(CLIENT_DIR))


def keyed_stack(ray_cluster):
    """A second application at /keyed that needs API_KEY (for 401s, stream tokens, the page's key)."""
    if "stack" not in _deployed:
        from app.security import hash_key
        from tests.conftest import deploy, serve_args

        args = serve_args(security={"api_keys": [{"id": "tester", "key_sha256": hash_key(API_KEY)}]})
        _deployed["stack"] = deploy(ray_cluster, KEYED_APP, KEYED_PREFIX, args,
                                    replica_options={"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.2}})
    return _deployed["stack"]
