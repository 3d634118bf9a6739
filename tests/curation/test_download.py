"""img2dataset on one shard against the loopback server: originals kept, reasons, per-domain limit."""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.parquet as pq

from common.config import DownloadConfig
from curation import download, inputs
from shards import curated


def _shard(tmp_path, urls):
    work = tmp_path / "input"
    pq.write_table(pa.table({"url": urls, "caption": [f"c{i}" for i in range(len(urls))]}), tmp_path / "urls.parquet")
    assert inputs.split_input(tmp_path / "urls.parquet", work, 100) == 1
    return work / "00000.parquet"


def _run(src, folder, limit, threads=8):
    d = DownloadConfig(
        threads=threads, timeout=2, retries=0, per_domain_limit=limit, robots_txt=False, allow_networks=["127.0.0.1/32"]
    )  # the fixture server's address, nothing else
    download.download_shard(src, folder, 0, download.crawl_of(d))


def test_download_shard_keeps_bytes_and_reports_reasons(server, image_dir, tmp_path):
    f = server.fault_urls()
    urls = [
        f"{server.url}/square-1k.jpg",
        f"{server.url}/portrait-1k.png",
        f["http_404"],
        f["opt_out"],
        f["connection_error"],
        "ftp://example.invalid/x.jpg",
    ]
    src = _shard(tmp_path, urls)
    _run(src, tmp_path / "dl", limit=4)
    assert download.stats_path(tmp_path / "dl", 0).exists()
    rows = {r["url"]: r for r in download.iter_shard(src, tmp_path / "dl", 0)}
    assert len(rows) == len(urls)
    for name in ("square-1k.jpg", "portrait-1k.png"):
        r = rows[f"{server.url}/{name}"]
        served = curated.read_member(r["src"], r["offset"], r["size"])  # at the recorded place in the tar
        assert (
            r["reason"] == ""
            and hashlib.sha256(served).digest() == hashlib.sha256((image_dir / name).read_bytes()).digest()
        )  # the served bytes, untouched
    assert [rows[u]["reason"] for u in urls[2:]] == ["http_404", "opt_out", "connection_error", "invalid_url"]
    n = len(server.requests)
    _run(src, tmp_path / "dl", limit=4)  # done shard (stats file): not downloaded again
    assert len(server.requests) == n


def test_per_domain_limit(server, tmp_path):
    urls = [f"{server.url}/delay/300/small.jpg?i={i}" for i in range(8)]
    src = _shard(tmp_path, urls)
    server.max_inflight = 0
    _run(src, tmp_path / "limited", limit=2)
    assert server.max_inflight == 2  # 8 threads, but never more than 2 requests in flight to the host
    rows = list(download.iter_shard(src, tmp_path / "limited", 0))
    assert all(r["reason"] == "" for r in rows)


def test_link_cap_shares_the_bandwidth_between_connections(image_dir):
    """The benchmark's emulated network link: concurrent downloads together never beat the cap."""
    import time
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    from demo.serve import ImageServer

    name = "square-1k.jpg"
    size = (image_dir / name).stat().st_size
    with ImageServer(image_dir, link_mbps=8 * size / 1e6 / 0.25) as srv:  # one file per 0.25 s
        t0 = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            bodies = list(
                pool.map(lambda i: urllib.request.urlopen(f"{srv.url}/{name}?i={i}", timeout=10).read(), range(4))
            )
        elapsed = time.monotonic() - t0
    assert all(b == (image_dir / name).read_bytes() for b in bodies)
    assert elapsed >= 4 * 0.25 * 0.95, elapsed  # 4 files through one link: at least 1 s, however many connections
