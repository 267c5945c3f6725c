"""superb-asv: the SUPERB speaker-verification recipe. The Python API: `asv.load_model(DIR_or_hub_id)` returns a
model with `embed`, `score` and `verify`; `asv.embed` and `asv.verify` are one-call forms; `asv.push_to_hub`
publishes a model directory."""

_API = ("embed", "verify", "dev_threshold", "load_model", "Verifier")


def __getattr__(name: str):
    # Lazy, so `import asv.audio` in a DataLoader worker does not pull in s3prl and the model code.
    if name in _API:
        from asv import api

        return getattr(api, name)
    if name == "push_to_hub":
        from asv.hub import push_to_hub

        return push_to_hub
    raise AttributeError(f"module 'asv' has no attribute {name!r}")
