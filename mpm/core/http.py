"""A client for OpenAI-compatible chat endpoints (vLLM, llama.cpp server, TGI, hosted APIs) and an on-disk cache.

Used by dialogue generation (unimm_chat) and by translation. Requests run in a bounded thread pool; 429, 5xx,
timeouts, connection errors and malformed responses are retried with exponential backoff (a `Retry-After` header is
honoured); every answer is stored in a SQLite cache as soon as it arrives, keyed by a hash of everything that went
into the request, so a killed run resumes without asking again.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import urllib3

from mpm.core.errors import ConfigError

RETRY_STATUSES = (408, 409, 429, 500, 502, 503, 504)


class LLMError(Exception):
    """A request failed for good (after its retries), with the reason. `fatal` errors (bad key, unknown model or
    URL) will fail every other request the same way: callers should stop rather than go on."""

    def __init__(self, message: str, fatal: bool = False):
        super().__init__(message)
        self.fatal = fatal


class ResponseCache:
    """key -> response text in one SQLite file; safe to share between threads; each put is committed at once."""

    def __init__(self, path: str | os.PathLike):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self._lock = threading.Lock()

    @staticmethod
    def key(*parts: Any) -> str:
        return hashlib.sha256(json.dumps(parts, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()

    def get(self, key: str) -> str | None:
        with self._lock:
            row = self._conn.execute("SELECT value FROM responses WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def put(self, key: str, value: str) -> None:
        with self._lock:
            self._conn.execute("INSERT OR REPLACE INTO responses (key, value) VALUES (?, ?)", (key, value))

    def __len__(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class ChatClient:
    """POST {base_url}/chat/completions. The API key comes from the environment variable `api_key_env`, if set."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout_s: float = 120.0,
        retries: int = 4,
        backoff_s: float = 1.0,
        concurrency: int = 8,
        temperature: float = 0.7,
        max_tokens: int = 1024,
    ):
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"the endpoint URL (base_url) must start with http:// or https://, got {base_url!r}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.concurrency = concurrency
        self.params = {"temperature": temperature, "max_tokens": max_tokens}
        self.headers = {"Content-Type": "application/json"}
        key = os.environ.get(api_key_env) if api_key_env else None
        if key:
            self.headers["Authorization"] = f"Bearer {key}"
        self.pool = urllib3.PoolManager(maxsize=concurrency, retries=False)

    def cache_key(self, messages: list[dict], tag: str = "") -> str:
        # Not the URL: the same model served from another host or port gives the same answers.
        return ResponseCache.key(self.model, self.params, messages, tag)

    def complete(self, messages: list[dict]) -> str:
        """One chat completion, retried on transient failures. Raises LLMError."""
        body = json.dumps({"model": self.model, "messages": messages, **self.params}).encode("utf-8")
        last = ""
        for attempt in range(self.retries + 1):
            wait = self.backoff_s * 2**attempt
            try:
                resp = self.pool.request(
                    "POST", self.url, body=body, headers=self.headers, timeout=urllib3.Timeout(total=self.timeout_s)
                )
            except urllib3.exceptions.NewConnectionError as exc:
                # Nothing listens there, or the name does not resolve: waiting will not fix it (one quick second
                # try covers a server that is just starting). Fatal: every other request would fail the same way.
                if attempt >= 1 or self.retries == 0:
                    raise LLMError(
                        f"cannot connect to {self.url} ({_reason(exc)}): is the server running? Check the endpoint URL "
                        "(--base-url / openai.base_url)",
                        fatal=True,
                    ) from None
                last, wait = f"{type(exc).__name__}: {exc}", 0.5
            except urllib3.exceptions.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if resp.status == 200:
                    try:
                        return _content(resp.data)
                    except (ValueError, KeyError, IndexError, TypeError) as exc:
                        last = f"malformed response ({exc}): {resp.data[:200]!r}"
                elif resp.status in (401, 403, 404):
                    raise LLMError(
                        f"HTTP {resp.status} from {self.url} (model {self.model!r}): check the URL, the model name and "
                        f"the API key environment variable. {resp.data[:200]!r}",
                        fatal=True,
                    )
                elif resp.status in RETRY_STATUSES:
                    last = f"HTTP {resp.status}: {resp.data[:200]!r}"
                    retry_after = resp.headers.get("Retry-After", "")
                    if retry_after.replace(".", "", 1).isdigit():
                        wait = max(wait, float(retry_after))
                else:
                    raise LLMError(f"HTTP {resp.status}: {resp.data[:300]!r}")
            if attempt < self.retries:
                time.sleep(wait)
        raise LLMError(f"{last} (after {self.retries + 1} attempts)")

    def complete_many(
        self, requests: Iterable[tuple[str, list[dict]]], cache: ResponseCache | None = None
    ) -> Iterator[tuple[str, str | LLMError, bool]]:
        """(cache key, messages) in; (cache key, text or LLMError, from_cache) out, in input order.

        At most `concurrency` requests are in flight; answers found in `cache` are returned without a request.
        Nothing is stored here: the caller caches what it accepts.
        """
        requests = iter(requests)
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="llm")
        pending: collections.deque = collections.deque()

        def submit(item):
            key, messages = item
            cached = cache.get(key) if cache is not None else None
            if cached is not None:
                pending.append((key, None, cached))
            else:
                pending.append((key, pool.submit(self._complete_or_error, messages), None))

        try:
            for item in itertools.islice(requests, 4 * self.concurrency):
                submit(item)
            while pending:
                key, future, cached = pending.popleft()
                for item in itertools.islice(requests, 1):
                    submit(item)
                if future is None:
                    yield key, cached, True
                else:
                    yield key, future.result(), False
        finally:  # Ctrl-C, an abort, or the caller stopping early: drop what has not started
            pool.shutdown(wait=False, cancel_futures=True)

    def _complete_or_error(self, messages: list[dict]) -> str | LLMError:
        try:
            return self.complete(messages)
        except LLMError as exc:
            return exc


def _reason(exc: Exception) -> str:
    """The last part of urllib3's message: "[Errno 111] Connection refused", "Failed to resolve 'host' (...)"."""
    return str(exc).rsplit(": ", 1)[-1]


def _content(data: bytes) -> str:
    payload = json.loads(data)
    choice = payload["choices"][0]
    content = choice["message"]["content"]
    if not isinstance(content, str):
        raise TypeError(f"message content is {type(content).__name__}")
    if choice.get("finish_reason") == "length":
        raise LLMError("the reply was cut at max_tokens: raise max_tokens (openai.max_tokens)")
    return content.encode("utf-8", "replace").decode("utf-8")  # a lone surrogate would break every writer
