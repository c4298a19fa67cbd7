"""Model names that are not local folders are hub ids: check, in a few seconds, that the hub can be reached.

Without a network, transformers spends 30-50 s retrying a hub id and ends in a long traceback. Before loading,
`check_model_source` sends one HEAD request to the hub (HF_ENDPOINT, default huggingface.co) through
huggingface_hub's own HTTP session, so proxies (HTTPS_PROXY) apply as they will for the download (3 s at most,
once per process). When it cannot be reached (no route, name resolution failing, connection refused):
    - a model already in the local cache is loaded from it (huggingface_hub's offline mode is switched on);
    - otherwise a one-line `ModelLoadError` names the config key, the value, and what to do.
Local folders are never checked; HF_HUB_OFFLINE=1 skips the check (the cache only, as the user asked).
"""

from __future__ import annotations

import functools
import logging
import os

from mpm.core.errors import ModelLoadError

logger = logging.getLogger(__name__)
CONNECT_TIMEOUT_S = 3.0


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


# Set when the probe (not the user) switched huggingface_hub to offline mode: later ids are still checked.
_offline_by_probe = False


@functools.lru_cache(maxsize=4)
def unreachable(url: str) -> str | None:
    """Why the hub at `url` cannot be reached ("[Errno 111] Connection refused", ...), or None when it answers
    (any HTTP status: it is there)."""
    from huggingface_hub import get_session

    try:
        get_session().head(url, timeout=CONNECT_TIMEOUT_S)
        return None
    except Exception as exc:  # the session's transport errors (no DNS, refused, timeout, proxy refusing): the reason
        return str(exc) or type(exc).__name__


def check_model_source(key: str, value) -> None:
    """Raise a one-line ModelLoadError when `value` (config key `key`) is a hub id that cannot be fetched now."""
    if value is None or not isinstance(value, str | os.PathLike) or os.path.isdir(value):
        return
    value = str(value)
    if value.startswith((".", "/", "~")) or value.count("/") > 1:  # a path, not owner/name
        raise ModelLoadError(f"{key}={value!r}: no such folder")
    from huggingface_hub import constants, try_to_load_from_cache

    global _offline_by_probe
    if constants.HF_HUB_OFFLINE and not _offline_by_probe:
        return  # offline by the user's choice: transformers reads the cache and says what is missing
    reason = unreachable(endpoint())
    if reason is None:
        return
    if isinstance(try_to_load_from_cache(value, "config.json"), str):
        logger.warning(
            "the model hub %s cannot be reached (%s): loading %s from the local cache", endpoint(), reason, value
        )
        constants.HF_HUB_OFFLINE = _offline_by_probe = True  # transformers asks huggingface_hub's is_offline_mode()
        return
    raise ModelLoadError(
        f"{key}={value!r} is not a local folder, and the model hub ({endpoint()}) cannot be reached ({reason}): "
        f"download the model where there is a network and give its folder ({key}=/path/to/model), or set "
        "HF_HUB_OFFLINE=1 to use what the local cache holds"
    )
