"""A crawl safe for the open web, shown by loopback servers' own request logs.

Addresses: 127.0.0.2 and 127.0.0.3 stand for the web (allowed by `allow_networks`, exactly),
127.0.0.1 for the cluster's inside (not allowed). No test sends traffic beyond 127.0.0.0/8.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.config import DownloadConfig
from curation import download, hosts, inputs
from demo.serve import ImageServer, endless, trickle

WEB = ["127.0.0.2/32", "127.0.0.3/32"]


@pytest.fixture
def web(image_dir):
    with ImageServer(image_dir, host="127.0.0.2") as srv:
        yield srv


@pytest.fixture
def web2(image_dir):
    with ImageServer(image_dir, host="127.0.0.3") as srv:
        yield srv


@pytest.fixture(scope="module")
def internal(image_dir):
    with ImageServer(image_dir, host="127.0.0.1") as srv:
        yield srv


def crawl(tmp_path, urls, **settings) -> dict[str, dict]:
    """Download `urls` as one shard through img2dataset with these `curation.download` settings."""
    d = DownloadConfig(
        **{"threads": 4, "timeout": 2, "retries": 0, "robots_txt": False, "allow_networks": WEB, **settings}
    )
    folder = tmp_path / f"crawl{len(list(tmp_path.glob('crawl*')))}"
    pq.write_table(pa.table({"url": urls}), folder.with_suffix(".parquet"))
    assert inputs.split_input(folder.with_suffix(".parquet"), folder / "input", 1000) == 1
    src = folder / "input" / "00000.parquet"
    download.download_shard(src, folder / "dl", 0, download.crawl_of(d))
    return {r["url"]: r for r in download.iter_shard(src, folder / "dl", 0)}


def reasons_of(rows: dict[str, dict], urls: list[str]) -> list[str]:
    return [rows[u]["reason"] for u in urls]


def jpeg(image_dir) -> tuple[int, dict, bytes]:
    return 200, {"Content-Type": "image/jpeg"}, (image_dir / "small.jpg").read_bytes()


# ---------------------------------------------------------------------------------------------
# Address guard
# ---------------------------------------------------------------------------------------------


def test_internal_addresses_are_refused_in_any_spelling_and_after_redirects(web, internal, tmp_path):
    port = internal.url.rsplit(":", 1)[1]
    spellings = ["127.0.0.1", "127.1", "2130706433", "0x7f000001", "0177.0.0.1", "[::ffff:127.0.0.1]", "localhost"]
    direct = [f"http://{h}:{port}/square-1k.jpg" for h in spellings]
    to_internal = web.add("/to-internal", (302, {"Location": internal.url + "/square-1k.jpg"}, b""))
    to_ftp = web.add("/to-ftp", (302, {"Location": "ftp://127.0.0.2/x.jpg"}, b""))
    to_web = web.add("/to-web", (301, {"Location": "/square-1k.jpg"}, b""))
    for i in range(5):
        web.add(f"/hop{i}", (302, {"Location": f"/hop{i + 1}"}, b""))
    before = len(internal.log)
    rows = crawl(tmp_path, direct + [to_internal, to_ftp, to_web, web.url + "/hop0"])
    assert reasons_of(rows, direct) == ["blocked_address"] * len(direct)
    assert reasons_of(rows, [to_internal, to_ftp, to_web]) == ["blocked_address", "blocked_address", ""]
    assert rows[web.url + "/hop0"]["reason"] == "too_many_redirects"
    assert len(internal.log) == before  # nothing reached the inside, in any spelling or via a redirect
    assert sorted(p for p in web.paths() if p.startswith("/hop")) == ["/hop0", "/hop1", "/hop2", "/hop3"]
    assert web.paths().count("/square-1k.jpg") == 1  # the allowed redirect was followed


def test_credentials_and_file_redirects_are_blocked_addresses(web, internal, tmp_path):
    host_port = internal.url.split("://", 1)[1]
    with_credentials = f"http://user:secret@{host_port}/square-1k.jpg"  # the inside, behind credentials
    to_file = web.add("/to-file", (302, {"Location": "file:///etc/passwd"}, b""))
    to_credentials = web.add("/to-credentials", (302, {"Location": with_credentials}, b""))
    web_credentials = web.url.replace("://", "://user:secret@") + "/square-1k.jpg"
    before = len(internal.log)
    rows = crawl(tmp_path, [with_credentials, to_file, to_credentials, web_credentials])
    assert reasons_of(rows, [with_credentials, to_file, to_credentials]) == ["blocked_address"] * 3
    assert rows[web_credentials]["reason"] == ""  # an allowed host is fetched, its credentials not sent
    assert len(internal.log) == before


def test_allow_networks_admits_an_internal_mirror_and_nothing_else(web, internal, tmp_path):
    urls = [internal.url + "/square-1k.jpg", web.url + "/square-1k.jpg"]
    rows = crawl(tmp_path, urls, allow_networks=["127.0.0.1/32"])
    assert reasons_of(rows, urls) == ["", "blocked_address"]
    assert internal.paths()[-1:] == ["/square-1k.jpg"] and web.log == []


# ---------------------------------------------------------------------------------------------
# Caps
# ---------------------------------------------------------------------------------------------


def test_oversized_and_trickling_bodies_stop_at_the_caps(web, image_dir, tmp_path):
    cap = 4 * 2**20
    declared = web.add("/declared-400MiB.png", endless(declared=400 * 2**20))
    endless_url = web.add("/endless.png", endless())
    trickling = web.add("/trickle.jpg", trickle(bytes_per_s=1))
    ok = web.url + "/square-1k.jpg"
    assert (image_dir / "square-1k.jpg").stat().st_size < cap
    tracemalloc.start()
    t0 = time.monotonic()
    rows = crawl(tmp_path, [declared, endless_url, trickling, ok], max_bytes=cap, max_seconds=2.0, timeout=5)
    elapsed = time.monotonic() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert reasons_of(rows, [declared, endless_url, trickling, ok]) == ["too_large", "too_large", "timeout", ""]
    assert elapsed < 2.0 + 3.0, elapsed  # the trickle was stopped at max_seconds, not at its 1 MB / 1 B/s
    assert peak < 3 * cap + 16 * 2**20, peak  # bodies were never held past the cap
    sent = {e["path"]: e["sent"] for e in web.log}
    assert sent["/declared-400MiB.png"] < 32 * 2**20  # refused on its header: socket buffers' worth at most
    assert sent["/endless.png"] < cap + 32 * 2**20  # cut once past the cap
    assert sent["/trickle.jpg"] <= 4


# ---------------------------------------------------------------------------------------------
# Retries
# ---------------------------------------------------------------------------------------------


def test_retries_mean_something(web, web2, image_dir, tmp_path):
    body = jpeg(image_dir)
    missing = web.url + "/missing.jpg"
    gone = web.add("/gone.jpg", (410, {}, b""))
    flaky = web.add("/flaky.jpg", (500, {}, b""), body)
    timeout_then_ok = web.add("/408.jpg", (408, {}, b""), body)
    busy = web2.add("/busy.jpg", (429, {"Retry-After": "1"}, b""), body)
    later = web2.add("/later.jpg", (429, {"Retry-After": "3600"}, b""))
    down = web2.add("/down.jpg", (503, {}, b""))
    urls = [missing, gone, flaky, timeout_then_ok, busy, later, down]
    rows = crawl(tmp_path, urls, retries=2, max_retry_after=10)
    assert reasons_of(rows, urls) == ["http_404", "http_410", "", "", "", "http_429", "http_503"]
    count = lambda srv, p: srv.paths().count(p)
    assert count(web, "/missing.jpg") == 1 and count(web, "/gone.jpg") == 1  # a 4xx is an answer
    assert count(web, "/flaky.jpg") == 2 and count(web, "/408.jpg") == 2
    assert count(web2, "/later.jpg") == 1  # Retry-After: 3600 is past the cap: give up, do not hammer
    assert count(web2, "/down.jpg") == 3  # retries + 1
    times = [e["time"] for e in web2.log if e["path"] == "/busy.jpg"]
    assert len(times) == 2 and times[1] - times[0] >= 0.95  # Retry-After: 1 honoured, then the image kept


# ---------------------------------------------------------------------------------------------
# Per-host scheduling
# ---------------------------------------------------------------------------------------------


def _fast_finish(srv: ImageServer, t0: float) -> float:
    return max(e["time"] for e in srv.log) - t0


def test_one_slow_host_does_not_delay_the_others(web, web2, tmp_path):
    slow = [f"{web2.url}/delay/1000/small.jpg?i={i}" for i in range(6)]  # more slow URLs than threads
    fast = [f"{web.url}/small.jpg?i={i}" for i in range(16)]
    t0 = time.monotonic()
    crawl(tmp_path, fast, per_domain_limit=1)
    alone = _fast_finish(web, t0)
    web.log.clear()
    t0 = time.monotonic()
    rows = crawl(tmp_path, slow + fast, per_domain_limit=1)
    beside_slow = _fast_finish(web, t0)
    assert all(r["reason"] == "" for r in rows.values())
    assert beside_slow < alone + 1.0, (alone, beside_slow)  # the slow host takes >= 6 s on its own
    assert time.monotonic() - t0 >= 6 * 0.95
    assert web2.max_inflight == 1 and web.max_inflight == 1  # and each host saw one request at a time


def test_numeric_spellings_of_one_host_share_its_limit(web, tmp_path):
    port = web.url.rsplit(":", 1)[1]
    urls = [
        f"http://{h}:{port}/delay/200/small.jpg?i={i}"
        for i, h in enumerate(["127.0.0.2", "127.2", "2130706434", "0x7f000002"] * 2)
    ]
    rows = crawl(tmp_path, urls, per_domain_limit=1)
    assert all(r["reason"] == "" for r in rows.values())
    assert web.max_inflight == 1


def test_host_key_normalises_names():
    assert {
        hosts.host_key(u)
        for u in ("http://127.1/", "http://2130706433:80/", "http://0x7f000001/x", "http://127.0.0.1./")
    } == {"127.0.0.1"}
    assert hosts.host_key("http://Example.COM./a") == "example.com"
    assert hosts.host_key("http://bücher.example/") == "xn--bcher-kva.example"
    assert hosts.host_key("http://[0:0::FFFF:7f00:1]/") == hosts.host_key("http://[::ffff:127.0.0.1]/")


def test_host_slots_hold_across_processes(tmp_path):
    """Download processes of a node share a host's slots (locks in one file), so the limit is node-wide."""
    lock = tmp_path / "hosts.lock"
    code = textwrap.dedent(f"""
        import sys
        from curation import hosts
        fd = hosts.Slots({str(lock)!r}, 1).acquire("example.com")
        print("held" if fd is not None else "none", flush=True)
        sys.stdin.read()
    """)
    other = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "held"
        assert hosts.Slots(lock, 1).acquire("example.com") is None  # taken by the other process
        for limit, host in ((2, "example.com"), (1, "example.org")):  # a second slot; another host's own slot
            fd = hosts.Slots(lock, limit).acquire(host)
            assert fd is not None
            hosts.Slots.release(fd)
    finally:
        other.communicate("")
    fd = hosts.Slots(lock, 1).acquire("example.com")  # released when that process let go
    assert fd is not None
    hosts.Slots.release(fd)


# ---------------------------------------------------------------------------------------------
# Opt-out and who we are
# ---------------------------------------------------------------------------------------------


def test_robots_txt_is_read_once_per_host_and_honoured(web, web2, image_dir, tmp_path):
    web.add(
        "/robots.txt",
        (
            200,
            {"Content-Type": "text/plain"},
            b"User-agent: sigmaforge\nDisallow: /private/\n\nUser-agent: *\nDisallow:\n",
        ),
    )
    web2.add("/robots.txt", (200, {"Content-Type": "text/plain"}, b"User-agent: img2dataset\nDisallow: /\n"))
    allowed = [f"{web.url}/small.jpg?i={i}" for i in range(6)]
    private = web.url + "/private/small.jpg"
    blocked = [f"{web2.url}/small.jpg?i={i}" for i in range(3)]
    rows = crawl(tmp_path, allowed + [private] + blocked, robots_txt=True, contact="https://example.org/crawler")
    assert reasons_of(rows, allowed) == [""] * 6
    assert reasons_of(rows, [private] + blocked) == ["opt_out"] * 4
    assert web.paths().count("/robots.txt") == 1 and "/private/small.jpg" not in web.paths()
    assert web2.paths() == ["/robots.txt"]  # nothing but robots.txt from the host that said no
    for e in web.log:
        assert e["user_agent"].startswith("SigmaForge/") and "+https://example.org/crawler" in e["user_agent"]
        assert "Firefox" not in e["user_agent"] and "sigmaforge" in e["user_agent"]
    rows = crawl(tmp_path, blocked[:1], robots_txt=False)  # the operator's switch
    assert rows[blocked[0]]["reason"] == "" and web2.paths()[-1] == "/small.jpg?i=0"


def test_unreachable_robots_txt_means_do_not_crawl(web, tmp_path):
    web.add("/robots.txt", (503, {}, b""))
    urls = [f"{web.url}/small.jpg?i={i}" for i in range(3)]
    rows = crawl(tmp_path, urls, robots_txt=True, retries=2)
    assert reasons_of(rows, urls) == ["http_503"] * 3
    assert web.paths() == ["/robots.txt"]  # RFC 9309: a server error on robots.txt is a full disallow


@pytest.mark.parametrize(
    "value,opted_out",
    [
        ("noai", True),
        ("noimageai", True),
        ("none", True),
        ("NoAI", True),
        ("sigmaforge: noai", True),
        ("img2dataset: noimageai", True),
        ("googlebot: noindex, sigmaforge: none", True),
        ("noindex, noai", True),
        ("otherbot: noai", False),
        ("unavailable_after: 25 Jun 2030 15:00:00 PST", False),
        ("nofollow", False),
    ],
)
def test_x_robots_tag(value, opted_out):
    from curation import robots

    tokens, directives = ("sigmaforge", "img2dataset"), {"noai", "noimageai", "none"}
    assert robots.header_opts_out([value], tokens, directives) is opted_out


def test_x_robots_tag_variants_on_the_wire(web, image_dir, tmp_path):
    _, headers, body = jpeg(image_dir)
    tags = {
        "noai": "opt_out",
        "none": "opt_out",
        "sigmaforge: noimageai": "opt_out",
        "img2dataset: noai": "opt_out",
        "otherbot: noai": "",
    }
    urls = [web.add(f"/tag{i}.jpg", (200, {**headers, "X-Robots-Tag": t}, body)) for i, t in enumerate(tags)]
    rows = crawl(tmp_path, urls)
    assert reasons_of(rows, urls) == list(tags.values())
    assert sorted(web.paths()) == sorted(f"/tag{i}.jpg" for i in range(len(tags)))


# ---------------------------------------------------------------------------------------------
# Issue 15, item 1: a shard with no valid URL
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("urls", [["ftp://example.invalid/a.jpg", "not a url", ""], [1, 2, 3]])
def test_a_shard_without_one_valid_url_is_not_a_crash(tmp_path, urls):
    pq.write_table(pa.table({"url": urls}), tmp_path / "urls.parquet")
    assert inputs.split_input(tmp_path / "urls.parquet", tmp_path / "input", 1000) == 1
    src = tmp_path / "input" / "00000.parquet"
    download.download_shard(src, tmp_path / "dl", 0, download.crawl_of(DownloadConfig(allow_networks=WEB)))
    rows = list(download.iter_shard(src, tmp_path / "dl", 0))
    assert [r["reason"] for r in rows] == ["invalid_url"] * 3
    assert download.stats_path(tmp_path / "dl", 0).exists()  # done: a rerun does not try again


# ---------------------------------------------------------------------------------------------
# The new reasons, through the whole stage into the manifest and the report
# ---------------------------------------------------------------------------------------------


def test_new_reasons_reach_the_manifest_and_the_report(ray_local, tiny_models, web, internal, image_dir, tmp_path):
    import io

    import pandas as pd
    from PIL import Image

    from common import config
    from curation import pipeline
    from shards import reasons

    gif = io.BytesIO()
    Image.open(image_dir / "square-1k.jpg").save(gif, "GIF")
    web.add("/robots.txt", (200, {}, b"User-agent: *\nDisallow: /private/\n"))
    cases = {
        "kept": web.url + "/square-1k.jpg",
        "blocked_address": internal.url + "/hires-2k.jpg",
        "too_large": web.url + "/uhd-4k.jpg",
        "unsupported_format": web.add("/anim.gif", (200, {"Content-Type": "image/gif"}, gif.getvalue())),
        "opt_out": web.url + "/private/square-1k.jpg",
    }
    cap = (image_dir / "uhd-4k.jpg").stat().st_size - 1
    assert (image_dir / "square-1k.jpg").stat().st_size < cap
    pq.write_table(pa.table({"url": list(cases.values()), "name": list(cases)}), tmp_path / "urls.parquet")
    cfg = config.load(
        config.DEFAULT_CONFIG,
        "demo",
        [f"curation.download.allow_networks=[{WEB[0]}]", f"curation.download.max_bytes={cap}"],
    )
    before = len(internal.log)
    pipeline.run(tmp_path / "urls.parquet", tmp_path / "out", cfg)
    m = pd.read_parquet(tmp_path / "out" / "manifest.parquet").set_index("name")
    got = {name: (m.loc[name, "status"], m.loc[name, "reason"]) for name in cases}
    want = {
        name: (reasons.status_of(None if name == "kept" else name), None if name == "kept" else name) for name in cases
    }
    assert got == want
    assert all(got[n][0] == "failed" for n in cases if n != "kept")
    assert len(internal.log) == before
    page = (tmp_path / "out" / "report.html").read_text()
    for name in cases:
        if name != "kept":
            assert f">{name}<" in page  # in the report's counts by reason
    assert "127.0.0.2/32" in page  # and the crawl settings it ran under
