"""Tests for pixelmill.tasks.download: exact-N retrieval downloads, retries, timeouts, SSRF guard.

Every server here is a loopback ``http.server`` (tests/helpers/http_server.py); the suite's
network guard makes any other connection raise, and ``connects`` records every connection
the code under test opens.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest

from pixelmill.tasks.download import (
    DownloadConfig,
    ExactNResult,
    check_url,
    classify_address,
    download_exact_n,
    fetch_image,
    make_client,
    robots_disallow,
    run_download_exact_n,
)
from tests.helpers.http_server import LoopbackHTTPServer, encode, image_server, make_image, serve_directory

RES = 64


@pytest.fixture()
def server() -> LoopbackHTTPServer:
    with image_server() as srv:
        yield srv


@pytest.fixture()
def delays() -> list[float]:
    return []


@pytest.fixture()
def cfg(delays: list[float]) -> DownloadConfig:
    """Loopback allowed (the test server), small timeout and images, sleeps recorded, not slept."""

    async def sleep(seconds: float) -> None:
        delays.append(seconds)

    return DownloadConfig(allow_loopback=True, timeout=0.5, resolution=RES, max_bytes=200_000, sleep=sleep)


@pytest.fixture()
def connects(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every socket address connected to from now on (through the suite's guard)."""
    seen: list[Any] = []
    guarded = socket.socket.connect

    def spy(sock: socket.socket, address: Any) -> Any:
        seen.append(address)
        return guarded(sock, address)

    monkeypatch.setattr(socket.socket, "connect", spy)
    return seen


def cands(srv: LoopbackHTTPServer, *paths: str) -> list[dict[str, Any]]:
    """Candidates ``c0, c1, ...`` for ``paths``, similarity strictly descending."""
    return [{"id": f"c{i}", "url": p if "://" in p else srv.url(p), "similarity": round(0.99 - i * 0.01, 4),
             "caption": f"caption {i}"} for i, p in enumerate(paths)]


def fetch(url: str, cfg: DownloadConfig):
    async def go():
        async with make_client(cfg) as client:
            return await fetch_image(client, url, cfg)

    return asyncio.run(go())


def ids(rows: list[dict[str, Any]]) -> list[str]:
    return [r["id"] for r in rows]


def assert_accounted(result: ExactNResult, candidates: list[dict[str, Any]]) -> None:
    """Every candidate is in exactly one bucket, and the stats add up."""
    buckets = ids(result.accepted) + ids(result.failed) + ids(result.dropped) + ids(result.not_tried)
    assert sorted(buckets) == sorted(ids(candidates))
    s = result.stats
    assert s["count"] == len(candidates) == (s["successes"] + s["failed_to_download"] + s["failed_to_resize"]
                                             + s["duplicates"] + s["surplus"] + s["not_tried"])


MIXED = [
    "/img/a.png",        # c0  accepted rank 0
    "/status/404",       # c1  http_404
    "/dup-a.png",        # c2  accepted rank 1
    "/stall",            # c3  timeout
    "/dup-b.png",        # c4  same bytes as c2
    "/page.html",        # c5  not_an_image: text/html
    "/corrupt.png",      # c6  undecodable (decode stage)
    "/flaky.png",        # c7  accepted rank 2 after two 503s
    "/noai.png",         # c8  robots: noai
    "/to-metadata",      # c9  blocked after the redirect
    "/trickle",          # c10 timeout (total deadline)
    "/to-private",       # c11 blocked after the redirect
    "/huge.png",         # c12 too_large (Content-Length)
    "/loop",             # c13 redirect_loop
    "file:///etc/passwd",  # c14 unsupported_scheme
    "/img/b.jpg",        # c15 accepted rank 3
    "/dup-c.png",        # c16 same pixels as c2, different bytes
    "/img/c.png",        # c17 accepted rank 4
    "/img/d.png",        # c18.. not needed
    "/img/e.png",
    "/img/f.png",
    "/img/g.png",
    "/img/h.png",
    "/img/i.png",
]


def test_exact_n_accepts_top_n_successful_distinct_and_records_everything_else(
        server: LoopbackHTTPServer, cfg: DownloadConfig, connects: list[Any]) -> None:
    candidates = cands(server, *MIXED)
    result = asyncio.run(download_exact_n(candidates, 5, cfg))

    assert ids(result.accepted) == ["c0", "c2", "c7", "c15", "c17"]
    assert [a["rank"] for a in result.accepted] == [0, 1, 2, 3, 4]
    assert [a["candidate_rank"] for a in result.accepted] == [0, 2, 7, 15, 17]
    assert result.shortfall == 0 and result.message is None
    for a in result.accepted:
        assert a["image"].mode == "RGB" and max(a["image"].size) == RES
        assert a["caption"] and a["similarity"] and a["http_status"] == 200 and len(a["sha256"]) == 64
    assert len({a["sha256"] for a in result.accepted}) == 5
    assert result.accepted[2]["attempts"] == 3
    assert result.accepted[3]["content_type"] == "image/jpeg"

    reasons = {f["id"]: f["error_message"] for f in result.failed}
    assert reasons == {
        "c1": "http_404",
        "c3": "timeout",
        "c5": "not_an_image: text/html",
        "c6": "undecodable",
        "c8": "robots: noai",
        "c9": "blocked_address: 169.254.169.254 (link-local)",
        "c10": "timeout",
        "c11": "blocked_address: 10.0.0.1 (private)",
        "c12": "too_large",
        "c13": "redirect_loop",
        "c14": "unsupported_scheme: file",
    }
    by_id = {f["id"]: f for f in result.failed}
    assert by_id["c1"]["http_status"] == 404 and by_id["c1"]["attempts"] == 1
    assert by_id["c6"]["failed_stage"] == "decode" and by_id["c5"]["failed_stage"] == "download"
    assert by_id["c9"]["final_url"] == "http://169.254.169.254/latest"

    dropped = {d["id"]: d["reason"] for d in result.dropped}
    assert dropped.pop("c4") == "duplicate_of:c2"
    assert dropped.pop("c16") == "duplicate_of:c2"
    assert set(dropped.values()) <= {"surplus"}
    later = {f"c{i}" for i in range(18, len(MIXED))}
    assert set(dropped) | set(ids(result.not_tried)) == later
    assert set(dropped).isdisjoint(ids(result.not_tried))

    s = result.stats
    assert (s["successes"], s["failed_to_download"], s["failed_to_resize"], s["duplicates"]) == (5, 10, 1, 2)
    assert s["status_dict"]["success"] == 5 and s["status_dict"]["timeout"] == 2
    assert s["status_dict"]["blocked_address"] == 2 and s["status_dict"]["http_404"] == 1
    assert_accounted(result, candidates)
    assert server.hits["/dup-b.png"] == 1 and server.hits["/flaky.png"] == 3
    assert all(addr[0] == "127.0.0.1" for addr in connects)


def test_shortfall_is_reported_not_padded(server: LoopbackHTTPServer, cfg: DownloadConfig) -> None:
    candidates = cands(server, "/img/a.png", "/status/404", "/dup-a.png", "/dup-b.png", "/corrupt.png")
    result = asyncio.run(download_exact_n(candidates, 5, cfg))

    assert ids(result.accepted) == ["c0", "c2"]
    assert result.shortfall == 3 and result.stats["shortfall"] == 3
    assert "found 5 candidates" in result.message and "downloaded 2" in result.message
    assert "needed 5" in result.message
    assert [d["reason"] for d in result.dropped] == ["duplicate_of:c2"]
    assert result.not_tried == []
    assert_accounted(result, candidates)


def test_choice_does_not_depend_on_network_timing(server: LoopbackHTTPServer, cfg: DownloadConfig) -> None:
    paths = ["/slow/top.png", "/status/500", "/img/b.png", "/slow/c.png", "/img/d.png", "/img/e.png", "/img/f.png"]
    expected = ["c0", "c2", "c3"]
    for concurrency in (1, 3, 32):
        c = cfg.model_copy(update={"concurrency": concurrency, "retries": 0, "timeout": 2.0})
        result = asyncio.run(download_exact_n(cands(server, *paths), 3, c))
        assert ids(result.accepted) == expected, concurrency
        assert len(result.accepted) == 3
        assert_accounted(result, cands(server, *paths))


def test_never_more_than_n_surplus_is_dropped_not_failed(server: LoopbackHTTPServer, cfg: DownloadConfig) -> None:
    candidates = cands(server, "/slow/a.png", *[f"/img/x{i}.png" for i in range(12)])
    result = asyncio.run(download_exact_n(candidates, 1, cfg.model_copy(update={"timeout": 2.0})))

    assert ids(result.accepted) == ["c0"]
    assert result.failed == []
    surplus = [d for d in result.dropped if d["reason"] == "surplus"]
    assert surplus and len(surplus) == len(result.dropped)
    assert {d["fetch_status"] for d in surplus} <= {"success", "failed", "cancelled"}
    assert all("image" not in d for d in surplus)
    assert result.stats["tried"] <= 2
    assert_accounted(result, candidates)


def test_zero_needed_tries_nothing(server: LoopbackHTTPServer, cfg: DownloadConfig) -> None:
    candidates = cands(server, "/img/a.png")
    result = asyncio.run(download_exact_n(candidates, 0, cfg))
    assert (result.accepted, result.shortfall, ids(result.not_tried)) == ([], 0, ["c0"])
    assert server.hits["/img/a.png"] == 0


def test_same_url_twice_is_fetched_once_and_dropped_as_duplicate(server: LoopbackHTTPServer,
                                                                 cfg: DownloadConfig) -> None:
    candidates = cands(server, "/img/a.png", "/img/a.png", "/img/b.png")
    result = asyncio.run(download_exact_n(candidates, 2, cfg))
    assert ids(result.accepted) == ["c0", "c2"]
    assert [d["reason"] for d in result.dropped] == ["duplicate_of:c0"]
    assert server.hits["/img/a.png"] == 1


def test_bad_rows_become_failures_bad_lists_raise_before_work(server: LoopbackHTTPServer,
                                                              cfg: DownloadConfig) -> None:
    candidates = cands(server, "/img/a.png", "/img/b.png", "/img/c.png")
    candidates[0]["url"] = None
    candidates[1]["url"] = "not a url"
    result = asyncio.run(download_exact_n(candidates, 1, cfg))
    errors = {f["id"]: f["error_message"] for f in result.failed}
    assert errors == {"c0": "invalid_url", "c1": "unsupported_scheme: none"}
    assert ids(result.accepted) == ["c2"]

    unsorted = cands(server, "/img/a.png", "/img/b.png")
    unsorted[1]["similarity"] = 1.5
    with pytest.raises(ValueError, match=r"candidates\[1\].*not sorted"):
        asyncio.run(download_exact_n(unsorted, 1, cfg))
    dup_ids = cands(server, "/img/a.png", "/img/b.png")
    dup_ids[1]["id"] = "c0"
    with pytest.raises(ValueError, match="duplicate id"):
        asyncio.run(download_exact_n(dup_ids, 1, cfg))
    with pytest.raises(ValueError, match="has no 'url'"):
        asyncio.run(download_exact_n([{"id": "x", "similarity": 0.9}], 1, cfg))
    assert sum(server.hits.values()) == 1


def test_retries_back_off_through_the_injected_sleep(server: LoopbackHTTPServer, cfg: DownloadConfig,
                                                     delays: list[float]) -> None:
    r = fetch(server.url("/flaky.png"), cfg)
    assert (r.status, r.attempts, delays) == ("success", 3, [0.5, 1.0])

    delays.clear()
    r = fetch(server.url("/status/503"), cfg.model_copy(update={"retries": 3, "backoff": 0.25}))
    assert (r.error_message, r.http_status, r.attempts, delays) == ("http_503", 503, 4, [0.25, 0.5, 1.0])

    delays.clear()
    r = fetch(server.url("/status/429"), cfg.model_copy(update={"retries": 1}))
    assert (r.error_message, r.attempts, delays) == ("http_429", 2, [0.5])

    delays.clear()
    for path in ("/status/404", "/status/403", "/page.html", "/to-private"):
        r = fetch(server.url(path), cfg)
        assert r.attempts == 1, path
    assert delays == []


def test_stalled_and_trickling_servers_hit_the_total_deadline(server: LoopbackHTTPServer, cfg: DownloadConfig,
                                                              delays: list[float]) -> None:
    one_try = cfg.model_copy(update={"retries": 0})
    for path in ("/stall", "/trickle"):
        r = fetch(server.url(path), one_try)
        assert (r.status, r.error_message, r.attempts) == ("failed", "timeout", 1), path
        assert r.seconds < 5, path
    assert server.bytes_sent["/trickle"] >= 1

    r = fetch(server.url("/stall"), cfg.model_copy(update={"retries": 1}))
    assert (r.error_message, r.attempts, delays) == ("timeout", 2, [0.5])


def test_bodies_over_max_bytes_are_abandoned(server: LoopbackHTTPServer, cfg: DownloadConfig) -> None:
    declared = fetch(server.url("/huge.png"), cfg)
    assert (declared.error_message, declared.http_status) == ("too_large", 200)
    streamed = fetch(server.url("/huge-stream.png"), cfg)
    assert streamed.error_message == "too_large"
    assert server.bytes_sent["/huge-stream.png"] < server.huge_size
    assert fetch(server.url("/img/a.png"), cfg.model_copy(update={"max_bytes": 50})).error_message == "too_large"


def test_redirects_are_followed_by_hand_and_bounded(server: LoopbackHTTPServer, cfg: DownloadConfig) -> None:
    r = fetch(server.url("/to-img"), cfg)
    assert r.status == "success" and r.final_url == server.url("/img/redirected.png")
    assert fetch(server.url("/chain/5"), cfg).status == "success"
    assert fetch(server.url("/chain/6"), cfg).error_message == "too_many_redirects"
    assert fetch(server.url("/loop-a"), cfg).error_message == "redirect_loop"


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://169.254.169.254/latest/meta-data/", "blocked_address: 169.254.169.254 (link-local)"),
        ("http://10.0.0.1/x.png", "blocked_address: 10.0.0.1 (private)"),
        ("http://172.16.5.4/x.png", "blocked_address: 172.16.5.4 (private)"),
        ("http://192.168.1.1/x.png", "blocked_address: 192.168.1.1 (private)"),
        ("http://[fd00::1]/x.png", "blocked_address: fd00::1 (private)"),
        ("http://[fe80::1]/x.png", "blocked_address: fe80::1 (link-local)"),
        ("http://224.0.0.1/x.png", "blocked_address: 224.0.0.1 (multicast)"),
        ("http://0.0.0.0/x.png", "blocked_address: 0.0.0.0 (unspecified)"),
        ("http://240.0.0.1/x.png", "blocked_address: 240.0.0.1 (reserved)"),
        ("http://[::ffff:169.254.169.254]/", "blocked_address: ::ffff:a9fe:a9fe (link-local)"),
        ("http://127.0.0.1:8080/x.png", "blocked_address: 127.0.0.1 (loopback)"),
        ("http://[::1]:8080/x.png", "blocked_address: ::1 (loopback)"),
        ("http://2130706433/x.png", "blocked_address: 127.0.0.1 (loopback)"),
        ("http://0177.0.0.1/x.png", "invalid_url"),
        ("http://0xa9.254.169.254/x.png", "blocked_address: 169.254.169.254 (link-local)"),
        ("file:///etc/passwd", "unsupported_scheme: file"),
        ("ftp://example.com/x.png", "unsupported_scheme: ftp"),
        ("data:image/png;base64,iVBORw0KGgo=", "unsupported_scheme: data"),
        ("http://rebind.test/x.png", "blocked_address: 10.1.2.3 (private)"),
        ("http://nowhere.test/x.png", "dns_error"),
        ("http://public.test/x.png", None),
        ("https://93.184.216.34/x.png", None),
    ],
)
def test_check_url_refuses_internal_addresses_and_other_schemes(url: str, reason: str | None) -> None:
    table = {"rebind.test": ["93.184.216.34", "10.1.2.3"], "public.test": ["93.184.216.34"]}

    def resolver(host: str, port: int) -> list[str]:
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "unknown host")
        return table[host]

    assert check_url(url, DownloadConfig(), resolver=resolver) == reason


def test_check_url_uses_the_system_resolver_for_names() -> None:
    reason = check_url("http://localhost:9/x.png", DownloadConfig())
    assert reason is not None and reason.startswith("blocked_address: ") and reason.endswith("(loopback)")


def test_loopback_and_private_are_allowed_separately() -> None:
    loop_ok = DownloadConfig(allow_loopback=True)
    private_ok = DownloadConfig(allow_private_addresses=True)
    assert check_url("http://127.0.0.1/x", loop_ok) is None and check_url("http://[::1]/x", loop_ok) is None
    assert check_url("http://10.0.0.1/x", loop_ok) == "blocked_address: 10.0.0.1 (private)"
    assert check_url("http://10.0.0.1/x", private_ok) is None
    assert check_url("http://[fc00::5]/x", private_ok) is None
    assert check_url("http://127.0.0.1/x", private_ok) == "blocked_address: 127.0.0.1 (loopback)"
    both = DownloadConfig(allow_loopback=True, allow_private_addresses=True)
    assert check_url("http://169.254.169.254/latest", both) == "blocked_address: 169.254.169.254 (link-local)"
    assert classify_address("8.8.8.8") is None and classify_address("64:ff9b::a00:1") == "private"


def test_refused_urls_never_open_a_connection(server: LoopbackHTTPServer, connects: list[Any]) -> None:
    strict = DownloadConfig(timeout=0.5, retries=0)
    for url in (server.url("/img/a.png"), f"http://[::1]:{server.port}/img/a.png", "http://169.254.169.254/latest",
                "http://10.0.0.1/x.png", "file:///etc/passwd"):
        r = fetch(url, strict)
        assert r.status == "failed" and r.attempts == 1, url
        assert r.error_message.startswith(("blocked_address: ", "unsupported_scheme: ")), url
    assert connects == [] and sum(server.hits.values()) == 0

    loopback_only = strict.model_copy(update={"allow_loopback": True})
    for path, target in (("/to-private", "10.0.0.1"), ("/to-metadata", "169.254.169.254")):
        r = fetch(server.url(path), loopback_only)
        assert r.error_message.startswith(f"blocked_address: {target} "), path
    assert all(addr[0] == "127.0.0.1" for addr in connects) and len(connects) == 2
    assert server.hits["/to-private"] == server.hits["/to-metadata"] == 1


def test_connections_go_to_the_address_that_was_checked(server: LoopbackHTTPServer, connects: list[Any]) -> None:
    """A name that rebinds to loopback between the check and the connection is refused."""
    answers = {"rebinding.test": [["93.184.216.34"], ["127.0.0.1"]]}

    def rebinding(host: str, port: int) -> list[str]:
        queue = answers[host]
        return queue.pop(0) if len(queue) > 1 else queue[0]

    cfg = DownloadConfig(timeout=0.5, retries=0, resolver=rebinding)
    r = fetch(f"http://rebinding.test:{server.port}/img/a.png", cfg)
    assert r.error_message == "blocked_address: 127.0.0.1 (loopback)"
    assert connects == [] and sum(server.hits.values()) == 0

    named = DownloadConfig(timeout=2.0, allow_loopback=True, resolution=RES,
                           resolver=lambda host, port: ["127.0.0.1"])
    r = fetch(f"http://images.test:{server.port}/img/a.png", named)
    assert r.status == "success"
    assert server.requests[-1] == ("/img/a.png", f"images.test:{server.port}")
    assert connects and all(addr[0] == "127.0.0.1" for addr in connects)


def test_per_host_limit_under_the_global_limit(server: LoopbackHTTPServer, cfg: DownloadConfig) -> None:
    hosts = ["a.test", "b.test"]
    c = cfg.model_copy(update={"per_host_concurrency": 2, "concurrency": 32, "timeout": 5.0,
                               "resolver": lambda host, port: ["127.0.0.1"]})
    candidates = [{"id": f"{h}-{i}", "url": f"http://{h}:{server.port}/slow/{h}-{i}.png", "similarity": 0.9}
                  for i in range(5) for h in hosts]
    result = asyncio.run(download_exact_n(candidates, 10, c))
    assert len(result.accepted) == 10
    peaks = {h: server.max_active_by_host[f"{h}:{server.port}"] for h in hosts}
    assert peaks == {"a.test": 2, "b.test": 2}


def test_robots_tag_semantics_match_img2dataset(server: LoopbackHTTPServer, cfg: DownloadConfig) -> None:
    d = ("noai", "noimageai", "noindex", "noimageindex", "none")
    assert robots_disallow(["noai"], "pixelmill", d) == "noai"
    assert robots_disallow(["index, NoImageAI"], "pixelmill", d) == "noimageai"
    assert robots_disallow(["otherbot: noai"], "pixelmill", d) is None
    assert robots_disallow(["Pixelmill: noindex"], "pixelmill", d) == "noindex"
    assert robots_disallow(["unavailable_after: 25 Jun 2010 15:00:00 PST, none"], "pixelmill", d) == "none"
    assert robots_disallow(["noarchive", "nosnippet"], "pixelmill", d) is None

    assert fetch(server.url("/tagged.png?tag=otherbot:%20noai"), cfg).status == "success"
    assert fetch(server.url("/tagged.png?tag=pixelmill:%20noimageai"), cfg).error_message == "robots: noimageai"
    assert fetch(server.url("/tagged.png?tag=noarchive&tag=none"), cfg).error_message == "robots: none"
    ignoring = cfg.model_copy(update={"respect_robots_tags": False})
    assert fetch(server.url("/noai.png"), ignoring).status == "success"


def test_sync_wrapper_gives_exactly_n_per_prompt_from_a_served_directory(tmp_path: Path, cfg: DownloadConfig) -> None:
    for name in ("dog1", "dog2", "dog3", "cat1", "cat2"):
        (tmp_path / f"{name}.png").write_bytes(encode(make_image(name)))
    (tmp_path / "dog-copy.png").write_bytes((tmp_path / "dog1.png").read_bytes())
    (tmp_path / "notes.txt").write_text("not an image")
    with serve_directory(tmp_path) as srv:
        prompts = {
            "a photo of a dog": cands(srv, "/dog1.png", "/dog-copy.png", "/missing.png", "/notes.txt", "/dog2.png",
                                      "/dog3.png"),
            "a photo of a cat": cands(srv, "/cat1.png", "/cat2.png", "/../etc/passwd"),
        }
        results = {p: run_download_exact_n(c, 2, cfg) for p, c in prompts.items()}
        assert sum(srv.hits.values()) <= 9

    dog, cat = results["a photo of a dog"], results["a photo of a cat"]
    assert ids(dog.accepted) == ["c0", "c4"] and ids(cat.accepted) == ["c0", "c1"]
    assert {f["id"]: f["error_message"] for f in dog.failed} == {"c2": "http_404", "c3": "not_an_image: text/plain"}
    assert dog.dropped[0]["reason"] == "duplicate_of:c0"
    assert dog.shortfall == cat.shortfall == 0
    assert dog.accepted[0]["bytes_sha256"] != dog.accepted[1]["bytes_sha256"]


def test_sync_wrapper_works_inside_a_running_loop(server: LoopbackHTTPServer, cfg: DownloadConfig) -> None:
    async def caller() -> ExactNResult:
        return run_download_exact_n(cands(server, "/img/a.png", "/img/b.png"), 1, cfg)

    assert ids(asyncio.run(caller()).accepted) == ["c0"]


def test_any_client_gets_the_per_hop_check(server: LoopbackHTTPServer, connects: list[Any]) -> None:
    """Without make_client's connect-time guard, redirects are still checked before a connection."""
    import httpx

    cfg = DownloadConfig(timeout=0.5, retries=0, allow_loopback=True, resolution=RES)

    async def go(path: str):
        async with httpx.AsyncClient() as client:
            return await fetch_image(client, server.url(path), cfg)

    assert asyncio.run(go("/to-metadata")).error_message == "blocked_address: 169.254.169.254 (link-local)"
    assert asyncio.run(go("/to-private")).error_message == "blocked_address: 10.0.0.1 (private)"
    assert asyncio.run(go("/to-img")).status == "success"
    assert all(addr[0] == "127.0.0.1" for addr in connects)
