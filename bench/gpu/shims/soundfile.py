"""Import shim for `soundfile` on the GPU machine: sglang 0.5.17's HTTP server imports it at module
level for its realtime-audio endpoint, which a text model never serves. Using it fails clearly."""


class _Unavailable:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("soundfile is not shipped to the GPU machine (bench/gpu/shims)")


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _Unavailable
