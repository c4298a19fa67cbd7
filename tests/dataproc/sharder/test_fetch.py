import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from dataproc.sharder.config import FetchConfig, ShardConfig
from dataproc.sharder.fetch import Fetcher, FetchError, disallowed_directive
from mpm.core.config import load_config
from tests.conftest import image_bytes


def fetch_config(**overrides) -> FetchConfig:
    flags = {"fetch.timeout_s": 1.0, "fetch.retries": 0, "fetch.backoff_s": 0.01, "fetch.threads": 4}
    flags.update({f"fetch.{k}": v for k, v in overrides.items()})
    return load_config(ShardConfig, None, flags).fetch


def test_connections_are_reused(web):
    body = image_bytes()
    urls = [web.add(f"/img{i}.jpg", body=body) for i in range(30)]
    fetcher = Fetcher(fetch_config(threads=1))
    for url in urls:
        assert fetcher.fetch(url) == body
    assert web.connections == 1  # one keep-alive connection for 30 requests

    web.connections = 0
    fetcher = Fetcher(fetch_config(threads=4))
    with ThreadPoolExecutor(4) as pool:
        assert all(b == body for b in pool.map(fetcher.fetch, urls * 3))
    assert web.connections <= 4  # at most one per thread for 90 requests


def test_retries_with_exponential_backoff(web):
    url = web.add("/flaky.jpg", body=image_bytes(), fail_first=2)
    fetcher = Fetcher(fetch_config(retries=2, backoff_s=0.2))
    assert fetcher.fetch(url) == image_bytes()
    times = [t for path, t, _ in web.requests if path == "/flaky.jpg"]
    assert len(times) == 3  # two 503s, then success
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert 0.2 <= gaps[0] < 0.35 and 0.4 <= gaps[1] < 0.6  # backoff_s * 2**attempt


def test_retries_are_bounded_and_not_spent_on_404(web):
    busy = web.add("/busy.jpg", body=b"", fail_first=100)
    missing = web.base + "/missing.jpg"
    fetcher = Fetcher(fetch_config(retries=2, backoff_s=0.01))
    with pytest.raises(FetchError, match=r"HTTP 503 \(after 3 attempts\)"):
        fetcher.fetch(busy)
    with pytest.raises(FetchError, match=r"^HTTP 404$"):
        fetcher.fetch(missing)
    assert sum(p == "/busy.jpg" for p, _, _ in web.requests) == 3
    assert sum(p == "/missing.jpg" for p, _, _ in web.requests) == 1
    web.add("/error.jpg", status=500, body=b"oops")
    with pytest.raises(FetchError, match="HTTP 500"):
        fetcher.fetch(web.base + "/error.jpg")


def test_redirects_followed_bounded_and_loops_detected(web):
    body = image_bytes()
    web.add("/final.jpg", body=body)
    web.add("/hop1", status=302, headers={"Location": "/hop2"})
    web.add("/hop2", status=301, headers={"Location": web.base + "/final.jpg"})
    fetcher = Fetcher(fetch_config(max_redirects=2))
    assert fetcher.fetch(web.base + "/hop1") == body
    web.add("/a", status=302, headers={"Location": "/b"})
    web.add("/b", status=307, headers={"Location": "/a"})
    with pytest.raises(FetchError, match="redirect loop"):
        fetcher.fetch(web.base + "/a")
    for i in range(5):
        web.add(f"/chain{i}", status=302, headers={"Location": f"/chain{i + 1}"})
    with pytest.raises(FetchError, match="more than fetch.max_redirects=2 redirects"):
        fetcher.fetch(web.base + "/chain0")


def test_size_cap_with_and_without_content_length(web):
    big = b"\xff" * 300_000
    fetcher = Fetcher(fetch_config(max_bytes=100_000))
    with pytest.raises(FetchError, match="Content-Length 300000 > fetch.max_bytes 100000"):
        fetcher.fetch(web.add("/big.jpg", body=big))
    with pytest.raises(FetchError, match="body larger than fetch.max_bytes"):
        fetcher.fetch(web.add("/stream.jpg", body=big, chunked=True))


def test_timeout_and_unreachable_host(web):
    url = web.add("/slow.jpg", body=b"x", delay_s=1.5)
    fetcher = Fetcher(fetch_config(timeout_s=0.3))
    start = time.monotonic()
    with pytest.raises(FetchError, match="timeout after 0.3s") as info:
        fetcher.fetch(url)
    assert info.value.retryable and time.monotonic() - start < 1.2
    with pytest.raises(FetchError, match="connection error"):
        fetcher.fetch("http://127.0.0.1:1/closed-port.jpg")


def test_user_agent_sent_and_robots_opt_out(web):
    url = web.add("/noai.jpg", body=image_bytes(), headers={"X-Robots-Tag": "noindex, NoAI"})
    fetcher = Fetcher(fetch_config(user_agent="test-agent/1.0"))
    with pytest.raises(FetchError, match="X-Robots-Tag: noai") as info:
        fetcher.fetch(url)
    assert info.value.status == "filtered_opt_out"
    assert web.requests[-1][2]["User-Agent"] == "test-agent/1.0"
    other_bot = web.add("/other.jpg", body=image_bytes(), headers={"X-Robots-Tag": "otherbot: noai"})
    assert fetcher.fetch(other_bot) == image_bytes()
    allowed = Fetcher(fetch_config(disallowed_header_directives=[]))
    assert allowed.fetch(url) == image_bytes()


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["noai"], "noai"),
        (["noindex, noimageai"], "noimageai"),
        (["mpm-toolkit: noai"], "noai"),
        (["googlebot: noai"], None),
        (["noindex", "nofollow"], None),
        ([], None),
    ],
)
def test_x_robots_tag_parsing(values, expected):
    assert disallowed_directive(values, "mpm-toolkit", ["noai", "noimageai"]) == expected


def test_local_paths_and_file_urls(tmp_path):
    path = tmp_path / "a b.jpg"
    path.write_bytes(image_bytes())
    fetcher = Fetcher(fetch_config(max_bytes=10_000))
    assert fetcher.fetch(str(path)) == image_bytes()
    assert fetcher.fetch(path.as_uri()) == image_bytes()
    with pytest.raises(FetchError, match="no such file"):
        fetcher.fetch(str(tmp_path / "missing.jpg"))
    with pytest.raises(FetchError, match="is a folder"):
        fetcher.fetch(str(tmp_path))
    (tmp_path / "huge.jpg").write_bytes(b"0" * 20_000)
    with pytest.raises(FetchError, match="> fetch.max_bytes 10000"):
        fetcher.fetch(str(tmp_path / "huge.jpg"))
    with pytest.raises(FetchError, match="unsupported URL scheme 'ftp'"):
        fetcher.fetch("ftp://example.org/a.jpg")
