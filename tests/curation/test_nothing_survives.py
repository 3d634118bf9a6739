"""A URL list of which nothing survives (every URL dead, blocked or not http(s)) is a finished run:
the full manifest with each URL's reason, stats.json, report.html, no shards, exit 0, one line."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest


def _lists(server):
    faults = server.fault_urls()
    blocked = server.url.replace("127.0.0.1", "127.0.0.2")  # the demo profile allows exactly 127.0.0.1/32
    return {
        "dead": (
            [faults["http_404"], faults["connection_error"], f"{server.url}/no-such.jpg"],
            ["http_404", "connection_error", "http_404"],
        ),
        "blocked": (
            [f"{blocked}/square-1k.jpg", "http://10.0.0.1/x.jpg", "http://169.254.169.254/latest"],
            ["blocked_address"] * 3,
        ),
        "not_http": (["file:///etc/passwd", "file:///tmp/x.jpg", "ftp://example.invalid/a.jpg"], ["invalid_url"] * 3),
    }


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dead", "blocked", "not_http"])
def test_a_run_where_nothing_survives_finishes(kind, ray_local, tiny_models, server, tmp_path, capsys):
    from curation import run

    urls, expected = _lists(server)[kind]
    pq.write_table(pa.table({"url": urls}), tmp_path / "urls.parquet")
    out = tmp_path / "out"
    run.main(
        [
            "--urls",
            str(tmp_path / "urls.parquet"),
            "--out",
            str(out),
            "--profile",
            "demo",
            "--set",
            "curation.download.timeout=2",
            "--set",
            "curation.download.shard_size=2",
        ]
    )  # returns: exit 0
    said = capsys.readouterr()
    m = pd.read_parquet(out / "manifest.parquet").set_index("url")
    assert m.loc[urls, "reason"].tolist() == expected and set(m["status"]) == {"failed"}
    stats = json.loads((out / "stats.json").read_text())
    assert stats["urls"] == 3 and stats["kept"] == 0 and stats["shards"] == 0
    assert (out / "report.html").is_file() and not list((out / "shards").glob("*.tar"))
    assert json.loads(said.out.strip().splitlines()[-1])["kept"] == 0
    line = [x for x in said.err.splitlines() if "kept" in x]
    assert len(line) == 1 and "0 of 3 URLs kept" in line[0], said.err
