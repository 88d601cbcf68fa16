"""Import shim for Hugging Face `datasets`, used only on the GPU machine.

`sglang.benchmark.serving` imports every dataset loader at module level, and its MMMU loader does
`from datasets import load_dataset`. The GPU machine has no `datasets` package and no network, and
the random-ids and generated-shared-prefix datasets we run never call it; this module only lets the
import succeed. Calling it says so instead of failing obscurely.
"""


def load_dataset(*args, **kwargs):
    raise RuntimeError("Hugging Face `datasets` is not shipped to the GPU machine (bench/gpu/shims)")
