"""superb-asv: the SUPERB speaker-verification recipe. `asv.embed` and `asv.verify` are the Python API."""


def __getattr__(name: str):
    # Lazy, so `import asv.audio` in a DataLoader worker does not pull in s3prl and the model code.
    if name in ("embed", "verify", "dev_threshold"):
        from asv import api

        return getattr(api, name)
    raise AttributeError(f"module 'asv' has no attribute {name!r}")
