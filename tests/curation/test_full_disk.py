"""A full disk during curation is one line naming the file, exit status 2, and the rerun finishes."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ORDER = ["square-1k.jpg", "wide-1k.webp", "portrait-1k.png", "hires-2k.jpg"]


@pytest.mark.slow
def test_a_full_disk_is_one_line(ray_local, tiny_models, server, small_disk, tmp_path, capsys):
    from curation import run

    urls = {"url": [f"{server.url}/{n}" for n in ORDER], "caption": [f"photo {n}" for n in ORDER]}
    pq.write_table(pa.table(urls), tmp_path / "urls.parquet")  # with captions: no "no caption column" note
    out = small_disk(64 * 1024) / "out"
    with pytest.raises(SystemExit) as e:
        run.main(
            [
                "--urls",
                str(tmp_path / "urls.parquet"),
                "--out",
                str(out),
                "--profile",
                "demo",
                "--set",
                "curation.download.shard_size=2",
            ]
        )
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "disk full" in err and str(out) in err, err
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".*.tmp"))
