"""A second application in the test session: SmolLM2-135M-Instruct, a real trained model, at
/smollm2. The main app (tiny model, random weights) stays the default for tests that need speed,
not text; these tests judge the text."""

from __future__ import annotations

import pytest

from tests.conftest import SMALL, ServeStack, serve_args, wait_ready

ROUTE = "/smollm2"


@pytest.fixture(scope="session")
def smollm2_stack(ray_cluster, smollm2_model_path) -> ServeStack:
    # model_path is the dequantized directory itself (not the model id) so that clients which load
    # the tokenizer from /get_model_info's model_path (SGLang's test programs) find it locally.
    args = serve_args(
        model={"model_path": smollm2_model_path},
        engine={"torch_threads": 2, "max_total_tokens": 32768},
        ingress={"default_max_tokens": 64},
    )
    from ray import serve

    from app.config import AppSettings
    from app.deployments import build

    options = {"Ingress": SMALL, "Scheduler": SMALL,
               "ModelReplica": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 1}}}
    serve.run(build(AppSettings.from_args(args), options), name="smollm2", route_prefix=ROUTE,
              blocking=False)
    # A 30-layer model on a busy shared machine: give the first start more than the tiny app's.
    return wait_ready(f"http://127.0.0.1:{ray_cluster.http_port}{ROUTE}", "smollm2",
                      timeout_s=600)
