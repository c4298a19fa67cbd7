"""Fetching image bytes: http(s) with a shared connection pool, local paths and file:// URLs.

One `Fetcher` per worker process, used from many threads: urllib3's PoolManager is thread-safe and keeps
connections alive per host (connection reuse). Redirects and retries are done here, not by urllib3, so every
failure has a precise message ("redirect loop", "HTTP 503 after 3 attempts") and the retry spacing is ours.
"""

from __future__ import annotations

import os
import time
import urllib.parse

import urllib3

from dataproc.sharder.config import FetchConfig

REDIRECT_STATUSES = (301, 302, 303, 307, 308)
RETRY_STATUSES = (429, 500, 502, 503, 504)


class FetchError(Exception):
    """The sample could not be fetched. `status` is the record status it ends with."""

    def __init__(self, message: str, status: str = "failed_to_download", retryable: bool = False):
        super().__init__(message)
        self.status = status
        self.retryable = retryable


def disallowed_directive(header_values: list[str], token: str, disallowed: list[str]) -> str | None:
    """The first disallowed X-Robots-Tag directive that applies to us, else None.

    A header value is `[user-agent:] directive, directive, ...`; a value with a user-agent prefix applies only
    when the prefix is our token (img2dataset's rule, so sites that opted out of it are treated the same here).
    """
    wanted = {d.lower() for d in disallowed}
    for value in header_values:
        agent, sep, directives = value.partition(":")
        if not sep:
            directives = value
        elif agent.strip().lower() != token.lower():
            continue  # addressed to another crawler
        for directive in directives.split(","):
            if directive.strip().lower() in wanted:
                return directive.strip().lower()
    return None


class Fetcher:
    def __init__(self, cfg: FetchConfig):
        self.cfg = cfg
        self.pool = urllib3.PoolManager(num_pools=64, maxsize=cfg.threads, block=False, retries=False)
        self.headers = {"User-Agent": cfg.user_agent, "Accept": "image/*,*/*;q=0.8"}

    def fetch(self, url: str) -> bytes:
        """Bytes at `url` (http(s), file://, or a local path). Raises FetchError."""
        scheme = urllib.parse.urlsplit(url).scheme.lower()
        if scheme in ("http", "https"):
            return self._fetch_http(url)
        if scheme == "file":
            return self._read_local(urllib.parse.unquote(urllib.parse.urlsplit(url).path))
        if scheme and len(scheme) > 1:  # one letter is a Windows drive, not a scheme
            raise FetchError(f"unsupported URL scheme {scheme!r}")
        return self._read_local(url)

    def _read_local(self, path: str) -> bytes:
        try:
            size = os.path.getsize(path)
            if size > self.cfg.max_bytes:
                raise FetchError(f"file is {size} bytes > fetch.max_bytes {self.cfg.max_bytes}")
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise FetchError(f"no such file: {path}") from None
        except IsADirectoryError:
            raise FetchError(f"is a folder, not a file: {path}") from None
        except PermissionError:
            raise FetchError(f"permission denied: {path}") from None

    def _fetch_http(self, url: str) -> bytes:
        attempts = self.cfg.retries + 1
        for attempt in range(attempts):
            try:
                return self._follow(url)
            except FetchError as exc:
                if not exc.retryable or attempt == attempts - 1:
                    if exc.retryable and attempts > 1:
                        exc.args = (f"{exc.args[0]} (after {attempts} attempts)",)
                    raise
            time.sleep(self.cfg.backoff_s * 2**attempt)
        raise AssertionError("unreachable")

    def _follow(self, url: str) -> bytes:
        seen = {url}
        for _ in range(self.cfg.max_redirects + 1):
            location = self._get(url)
            if isinstance(location, bytes):
                return location
            url = urllib.parse.urljoin(url, location)
            if url in seen:
                raise FetchError(f"redirect loop at {url}")
            seen.add(url)
        raise FetchError(f"more than fetch.max_redirects={self.cfg.max_redirects} redirects")

    def _get(self, url: str) -> bytes | str:
        """One request: the body, or the Location to follow."""
        cfg = self.cfg
        deadline = time.monotonic() + cfg.timeout_s
        try:
            resp = self.pool.request(
                "GET",
                url,
                headers=self.headers,
                redirect=False,
                retries=False,
                preload_content=False,
                timeout=urllib3.Timeout(connect=cfg.timeout_s, read=cfg.timeout_s),
            )
        except urllib3.exceptions.NewConnectionError as exc:  # a subclass of ConnectTimeoutError in urllib3 2
            raise FetchError(f"connection error: {_reason(exc)}", retryable=True) from None
        except urllib3.exceptions.TimeoutError:
            raise FetchError(f"timeout after {cfg.timeout_s:g}s", retryable=True) from None
        except urllib3.exceptions.HTTPError as exc:
            raise FetchError(f"connection error: {_reason(exc)}", retryable=True) from None
        reusable = False  # whether the connection can go back to the pool (body fully read)
        try:
            if resp.status in REDIRECT_STATUSES or resp.status != 200:
                resp.drain_conn()  # small bodies (redirects, error pages): read them so the connection is reused
                reusable = True
            if resp.status in REDIRECT_STATUSES:
                location = resp.headers.get("Location")
                if not location:
                    raise FetchError(f"HTTP {resp.status} redirect without a Location header")
                return location
            if resp.status != 200:
                raise FetchError(f"HTTP {resp.status}", retryable=resp.status in RETRY_STATUSES)
            directive = disallowed_directive(
                resp.headers.getlist("X-Robots-Tag"), cfg.user_agent_token, cfg.disallowed_header_directives
            )
            if directive:
                raise FetchError(f"X-Robots-Tag: {directive}", status="filtered_opt_out")
            length = resp.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > cfg.max_bytes:
                raise FetchError(f"Content-Length {length} > fetch.max_bytes {cfg.max_bytes}")
            chunks, total = [], 0
            for chunk in resp.stream(64 * 1024):
                total += len(chunk)
                if total > cfg.max_bytes:
                    raise FetchError(f"body larger than fetch.max_bytes {cfg.max_bytes}")
                if time.monotonic() > deadline:
                    raise FetchError(f"timeout after {cfg.timeout_s:g}s (body too slow)", retryable=True)
                chunks.append(chunk)
            reusable = True
            return b"".join(chunks)
        except urllib3.exceptions.TimeoutError:
            raise FetchError(f"timeout after {cfg.timeout_s:g}s", retryable=True) from None
        except urllib3.exceptions.HTTPError as exc:
            raise FetchError(f"connection error: {_reason(exc)}", retryable=True) from None
        finally:
            if not reusable:
                resp.close()  # cut short: the connection is in an unknown state
            resp.release_conn()


def _reason(exc: Exception) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason or exc).split(": ", 1)[-1][:200]
