"""The errors a user can cause, and fix. The CLI prints any `UserError` as one line (`error: ...`) and exits 2;
every other exception is a bug and keeps its traceback.

Messages name what is wrong (the file, the key, the value) and say what to do. Packages subclass these for their
own cases (a malformed annotation file is a `DataError`), so callers catch the kind, not the package.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class UserError(Exception):
    """Something the user gave is wrong; the message says what and how to fix it."""


class ConfigError(UserError, ValueError):
    """A configuration key or value is wrong; the message says where it came from."""


class DataError(UserError, ValueError):
    """An input file the user named is missing, unreadable or not in a format this toolkit reads."""


class ModelLoadError(UserError, ValueError):
    """A model folder or hub id does not hold a model this toolkit can load."""


class EndpointError(UserError):
    """An HTTP endpoint (an OpenAI-compatible server) refuses every request, or keeps failing."""


class ExportError(UserError, ValueError):
    """A checkpoint cannot be written in the format asked for; the message says why."""


@contextmanager
def model_errors(key: str, value, is_model: bool = True) -> Iterator[None]:
    """Loading the model that config key `key` names: a hub id that cannot be fetched now fails at once
    (mpm.core.hub; `is_model=False` for a value that is a setting, not a folder or hub id), and errors while loading
    become a one-line `ModelLoadError`: transformers raises OSError (no such folder or hub id, no weights) or
    ValueError (an unknown or unreadable config)."""
    if is_model:
        from mpm.core.hub import check_model_source

        check_model_source(key, value)
    try:
        yield
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load {key}={str(value)!r}: {first}") from None
