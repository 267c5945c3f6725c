"""The errors the `asv` package raises. Every one is an `AsvError` whose message is one line naming the file
or flag at fault and the fix; the scripts' `main` prints it as `error: <message>` and exits 1. The library
itself never exits, so `asv.embed()` on a bad file raises in the caller's process instead of ending it."""

from __future__ import annotations


class AsvError(Exception):
    """Base class: a problem with the user's input, files or settings, explained in one line."""


class ConfigError(AsvError, ValueError):
    """A flag, config file or config value that cannot work."""


class ManifestError(AsvError, ValueError):
    """A missing or malformed manifest or trial list; the message names the file and line."""


class CheckpointError(AsvError, ValueError):
    """A checkpoint that must not be loaded; the message says which file and why."""


class UpstreamError(AsvError, RuntimeError):
    """An upstream that cannot be built; the message says what to do."""


class AugmentError(AsvError, ValueError):
    """An augmentation setting that cannot work; the message names the flag and the fix."""


class HubError(AsvError, RuntimeError):
    """The Hugging Face Hub cannot be reached or refuses a request; the message says what to do offline."""


class BadAudioError(AsvError, ValueError):
    """A file that cannot give usable audio; `reason` is a short class (prepare.py counts by it)."""

    # Defaults let torch's DataLoader re-raise it from a worker with a single message argument.
    def __init__(self, path, reason: str = "", detail: str = ""):
        self.path, self.reason, self.detail = str(path), reason, detail
        super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else "") if reason else str(path))


def one_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (or its type), for embedding in a one-line error."""
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:limit]


def describe(err: AsvError) -> str:
    """The one line a script prints for `err`. An error raised in a DataLoader worker reaches the main process
    with the worker's traceback as its message; its last line is the original `module.Class: message`."""
    text = str(err).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        head, _, rest = last.partition(": ")
        return rest if rest and head.endswith(type(err).__name__) else last
    return text
