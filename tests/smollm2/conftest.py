"""A second application in the test session: SmolLM2-135M-Instruct, a real trained model, at
/smollm2. The main app (tiny model, random weights) stays the default for tests that need speed,
not text; these tests judge the text."""

from __future__ import annotations

import pytest

from tests.conftest import ServeStack, deploy, serve_args

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
    return deploy(ray_cluster, "smollm2", ROUTE, args,
                  {"num_replicas": 1, "ray_actor_options": {"num_cpus": 1}})
