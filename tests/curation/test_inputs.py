"""Curation inputs without Ray: URL lists in img2dataset's formats and column names, images on disk
(tars, folders, tables) indexed into the same input shards, and the entry point's --dry-run."""

from __future__ import annotations

import gzip
import io
import json
import tarfile

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation import inputs, sources
from shards.errors import SigmaError

URLS = [f"http://img.example/{i}.jpg" for i in range(5)]
ALT = [f"alt text {i}" for i in range(5)]


def laion(path):
    """A LAION-style parquet: upper-case URL / TEXT and the columns LAION ships with them."""
    pq.write_table(
        pa.table(
            {
                "URL": URLS,
                "TEXT": ALT,
                "WIDTH": [1024.0] * 5,
                "HEIGHT": [768.0] * 5,
                "similarity": [0.31, 0.32, 0.33, 0.34, 0.35],
                "hash": list(range(5)),
            }
        ),
        path,
    )
    return path


def shards_of(work):
    return pd.concat([pd.read_parquet(p) for p in sorted(work.glob("*.parquet"))], ignore_index=True)


def test_laion_parquet_columns_found_and_carried(tmp_path):
    found = inputs.url_list(laion(tmp_path / "laion.parquet"))
    assert (found.url_col, found.caption_col) == ("URL", "TEXT")
    assert found.split(tmp_path / "in", 2) == 3
    t = shards_of(tmp_path / "in")
    assert list(t.columns) == ["key", "url", "caption", "WIDTH", "HEIGHT", "similarity", "hash"]
    assert t["url"].tolist() == URLS and t["caption"].tolist() == ALT  # the alt text is the caption, not dropped
    assert t["key"].tolist() == [f"{i:010d}" for i in range(5)] and t["similarity"].iloc[4] == 0.35


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "txt", "csv.gz", "txt.gz"])
def test_text_formats(tmp_path, fmt, capsys):
    frame = pd.DataFrame({"url": URLS, "alt": ALT, "score": [1, 2, 3, 4, 5]})
    path = tmp_path / f"urls.{fmt}"
    base = fmt.removesuffix(".gz")
    text = {
        "csv": lambda: frame.to_csv(index=False),
        "tsv": lambda: frame.to_csv(index=False, sep="\t"),
        "jsonl": lambda: frame.to_json(orient="records", lines=True),
        "txt": lambda: "\n".join(URLS) + "\n\n",
    }[base]()
    path.write_bytes(gzip.compress(text.encode()) if fmt.endswith(".gz") else text.encode())
    found = inputs.url_list(path)
    assert found.describe()["rows"] == 5
    assert found.split(tmp_path / "in", 3) == 2
    t = shards_of(tmp_path / "in")
    assert t["url"].tolist() == URLS
    if base == "txt":
        assert found.caption_col is None and list(t.columns) == ["key", "url"]
    else:
        assert found.caption_col == "alt" and t["caption"].tolist() == ALT and t["score"].tolist() == [1, 2, 3, 4, 5]


def test_folder_and_glob_of_parts_are_one_list(tmp_path):
    parts = tmp_path / "parts"
    parts.mkdir()
    for i in range(2):
        pq.write_table(
            pa.table({"URL": URLS[i * 3 : i * 3 + 3], "TEXT": ALT[i * 3 : i * 3 + 3]}), parts / f"part-{i}.parquet"
        )
    (parts / "README.md").write_text("not a list")
    for spec in (parts, f"{parts}/part-*.parquet", f"{parts}/part-{{0..1}}.parquet"):
        found = inputs.url_list(spec)
        assert len(found.files) == 2 and found.describe()["rows"] == 5
    work = tmp_path / "in"
    assert inputs.url_list(parts).split(work, 4) == 2
    t = shards_of(work)
    assert t["url"].tolist() == URLS and t["key"].tolist() == [f"{i:010d}" for i in range(5)]
    pq.write_table(pa.table({"URL": ["http://x/1.jpg"], "other": ["y"]}), parts / "part-2.parquet")
    with pytest.raises(SigmaError, match="part-2.parquet: columns URL, other differ"):
        inputs.url_list(parts).split(tmp_path / "in2", 4)


def test_named_columns_and_clashes(tmp_path):
    path = tmp_path / "u.parquet"
    pq.write_table(pa.table({"link_to": URLS, "caption": ["old"] * 5, "TEXT": ALT, "status": ["x"] * 5}), path)
    with pytest.raises(SigmaError, match=r"u.parquet: no URL column \(looked for url, URL.*columns: link_to"):
        inputs.url_list(path)
    with pytest.raises(SigmaError, match="no column 'nope' \\(--url-col"):
        inputs.url_list(path, url_col="nope")
    found = inputs.url_list(path, url_col="link_to", caption_col="TEXT")
    found.split(tmp_path / "in", 10)
    t = shards_of(tmp_path / "in")
    assert t["caption"].tolist() == ALT and t["input_caption"].tolist() == ["old"] * 5  # kept, not the caption
    assert t["input_status"].tolist() == ["x"] * 5 and "link_to" not in t  # a manifest name is renamed


EXCEL_CAPTIONS = ["two\nlines", "plain", 'with "quotes", and a comma', "ünïcödé"]


def excel_csv(path):
    """A csv as Excel saves "CSV UTF-8": a byte-order mark, CRLF line ends, a cell typed with Alt+Enter."""
    frame = pd.DataFrame({"url": URLS[:4], "caption": EXCEL_CAPTIONS})
    path.write_bytes(b"\xef\xbb\xbf" + frame.to_csv(index=False, lineterminator="\r\n").encode())
    return path


@pytest.mark.parametrize("url_col", [None, "url"])
def test_a_csv_saved_by_excel_reads_as_its_rows(tmp_path, url_col):
    """Issue 28: the BOM is read as nothing (the header is `url`, with or without --url-col url), CRLF
    leaves no stray \r, and a quoted newline is part of its value: 4 rows, counted and split."""
    path = excel_csv(tmp_path / "excel.csv")
    assert path.read_bytes().startswith(b"\xef\xbb\xbfurl,caption\r\n")
    found = inputs.url_list(path, url_col=url_col)
    assert (found.url_col, found.caption_col, found.columns) == ("url", "caption", ("url", "caption"))
    assert found.describe()["rows"] == 4
    assert found.split(tmp_path / "in", 3) == 2
    t = shards_of(tmp_path / "in")
    assert t["url"].tolist() == URLS[:4] and t["caption"].tolist() == EXCEL_CAPTIONS


@pytest.mark.parametrize("fmt", ["tsv", "jsonl", "txt", "csv.gz"])
def test_a_bom_and_crlf_in_other_text_lists(tmp_path, fmt):
    frame = pd.DataFrame({"url": URLS, "alt": ALT})
    text = {
        "tsv": lambda: frame.to_csv(index=False, sep="\t", lineterminator="\r\n"),
        "jsonl": lambda: frame.to_json(orient="records", lines=True).replace("\n", "\r\n"),
        "txt": lambda: "\r\n".join(URLS) + "\r\n",
        "csv.gz": lambda: frame.to_csv(index=False, lineterminator="\r\n"),
    }[fmt]()
    data = b"\xef\xbb\xbf" + text.encode()
    path = tmp_path / f"urls.{fmt}"
    path.write_bytes(gzip.compress(data) if fmt.endswith(".gz") else data)
    found = inputs.url_list(path)
    assert found.url_col == "url" and found.describe()["rows"] == 5
    found.split(tmp_path / "in", 5)
    t = shards_of(tmp_path / "in")
    assert t["url"].tolist() == URLS
    if fmt != "txt":
        assert t["caption"].tolist() == ALT


def test_dry_run_counts_the_rows_of_an_excel_csv(tmp_path, tiny_models, capsys):
    from curation import run as cli

    path = excel_csv(tmp_path / "excel.csv")
    for extra in ([], ["--url-col", "url"]):
        cli.main(["--urls", str(path), *extra, "--out", str(tmp_path / "o"), "--profile", "demo", "--dry-run"])
        plan = json.loads(capsys.readouterr().out)["input"]
        assert plan["rows"] == 4 and plan["url_col"] == "url" and plan["caption_col"] == "caption"


def test_dry_run_reads_headers_and_says_when_there_is_no_caption(tmp_path, tiny_models, capsys):
    from curation import run as cli

    cli.main(
        [
            "--urls",
            str(laion(tmp_path / "laion.parquet")),
            "--out",
            str(tmp_path / "o"),
            "--profile",
            "demo",
            "--dry-run",
        ]
    )
    plan = json.loads(capsys.readouterr().out)["input"]
    assert plan["url_col"] == "URL" and plan["caption_col"] == "TEXT" and plan["rows"] == 5
    assert plan["carried"] == ["WIDTH", "HEIGHT", "similarity", "hash"]
    pq.write_table(pa.table({"url": URLS}), tmp_path / "bare.parquet")
    cli.main(["--urls", str(tmp_path / "bare.parquet"), "--out", str(tmp_path / "o"), "--profile", "demo", "--dry-run"])
    captured = capsys.readouterr()
    note = [line for line in captured.err.splitlines() if "no caption column" in line]
    assert len(note) == 1 and "bare.parquet" in note[0] and json.loads(captured.out)["input"]["caption_col"] is None
    cli.main(
        [
            "--urls",
            str(tmp_path / "laion.parquet"),
            "--caption-col",
            "hash",
            "--out",
            str(tmp_path / "o"),
            "--profile",
            "demo",
            "--dry-run",
        ]
    )
    assert json.loads(capsys.readouterr().out)["input"]["caption_col"] == "hash"
    with pytest.raises(SystemExit) as e:
        cli.main(["--images", str(tmp_path / "nothing-*.tar"), "--out", str(tmp_path / "o"), "--profile", "demo"])
    assert e.value.code == 2 and "no images found" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Images on disk
# ---------------------------------------------------------------------------------------------


def _tar(path, members: dict[str, bytes]):
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_tar_samples_point_into_the_users_tar(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    meta = {"url": "http://a/0.jpg", "key": "000000000", "status": "success", "width": 9, "similarity": 0.3}
    _tar(
        d / "00000.tar",
        {
            "000000000.jpg": b"JPEGDATA0",
            "000000000.txt": b"a red fox",
            "000000000.json": json.dumps(meta).encode(),
            "000000001.png": b"PNGDATA",
            "000000001.json": json.dumps({**meta, "url": "http://a/1.png", "caption": "from json"}).encode(),
            "000000002.json": b"{}",
        },
    )
    _tar(d / "00001.tar", {"x/a.webp": b"WEBP"})
    for spec in (d, f"{d}/*.tar", f"{d}/{{00000..00001}}.tar"):
        assert sources.local_images(spec).kind == "shards"
    src = sources.local_images(d, tmp_path / "out")
    work = tmp_path / "out" / "_work"
    assert src.split(work / "input", 1000) == 2  # one input shard per tar
    t = shards_of(work / "input")
    assert t["caption"].tolist() == ["a red fox", "from json", None, None]
    assert t["url"].tolist() == ["http://a/0.jpg", "http://a/1.png", None, None]
    assert t["source"].tolist()[0] == f"{d / '00000.tar'}::000000000.jpg"
    assert t["similarity"].tolist()[:2] == [0.3, 0.3] and "status" not in t  # img2dataset bookkeeping dropped
    rows = [r for i in range(2) for r in src.shard_rows(work, tmp_path / "out" / "downloads", i, None)]
    assert [r["reason"] for r in rows] == ["", "", "not_an_image", ""]  # a sample without an image: accounted
    from shards.curated import read_member

    assert [read_member(r["src"], r["offset"], r["size"]) for r in rows if r["src"]] == [
        b"JPEGDATA0",
        b"PNGDATA",
        b"WEBP",
    ]
    with pytest.raises(SigmaError, match="overlaps --out"):
        sources.local_images(d, d)


def test_folder_of_images_with_captions(tmp_path):
    d = tmp_path / "photos"
    (d / "b").mkdir(parents=True)
    (d / "a.jpg").write_bytes(b"A")
    (d / "a.txt").write_text("caption of a")
    (d / "b" / "c.PNG").write_bytes(b"CC")
    (d / "notes.md").write_text("not an image")
    src = sources.local_images(d)
    assert src.kind == "folder"
    work = tmp_path / "out" / "_work"
    assert src.split(work / "input", 1) == 2
    t = shards_of(work / "input")
    assert t["source"].tolist() == [str(d / "a.jpg"), str(d / "b" / "c.PNG")]
    assert t["caption"].tolist() == ["caption of a", None]
    rows = [r for i in range(2) for r in src.shard_rows(work, tmp_path / "out" / "downloads", i, None)]
    assert [(r["src"], r["offset"], r["size"]) for r in rows] == [
        (str(d / "a.jpg"), 0, 1),
        (str(d / "b" / "c.PNG"), 0, 2),
    ]
    with pytest.raises(SigmaError, match="overlaps --out"):
        sources.local_images(d, d / "curated")


HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets' Image feature on disk


@pytest.mark.parametrize("layout", ["hf-parquet", "binary-parquet", "hf-arrow"])
def test_table_bytes_copied_to_the_runs_own_tar(tmp_path, layout):
    (tmp_path / "side.jpg").write_bytes(b"FROMPATH")
    images = [
        {"bytes": b"IMG0", "path": "0.jpg"},
        {"bytes": None, "path": "side.jpg"},
        None,
        {"bytes": b"IMG3", "path": None},
    ]
    col = (
        pa.array(images, HF_IMAGE)
        if layout.startswith("hf")
        else pa.array([b"IMG0", b"FROMPATH", None, b"IMG3"], pa.binary())
    )
    table = pa.table({"image": col, "text": ALT[:4], "label": [1, 2, 3, 4]})
    path = tmp_path / ("t.arrow" if layout == "hf-arrow" else "t.parquet")
    if layout == "hf-arrow":  # datasets.save_to_disk writes the IPC stream format
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
    else:
        pq.write_table(table, path, row_group_size=2)
    src = sources.local_images(path)
    assert (src.kind, src.image_col, src.caption_col) == ("table", "image", "text")
    out = tmp_path / "out"
    assert src.split(out / "_work" / "input", 3) == 2
    t = shards_of(out / "_work" / "input")
    assert list(t.columns) == ["key", "url", "caption", "source", "label"]
    assert t["source"].tolist() == [f"{path}#{i}" for i in range(4)] and t["caption"].tolist() == ALT[:4]
    rows = [r for i in range(2) for r in src.shard_rows(out / "_work", out / "downloads", i, None)]
    from shards.curated import read_member

    assert [r["reason"] for r in rows] == ["", "", "not_an_image", ""]
    assert [read_member(r["src"], r["offset"], r["size"]) for r in rows if r["src"]] == [b"IMG0", b"FROMPATH", b"IMG3"]
    assert {r["src"] for r in rows if r["src"]} == {
        str(out / "downloads" / "00000.tar"),
        str(out / "downloads" / "00001.tar"),
    }
    pq.write_table(pa.table({"text": ALT}), tmp_path / "no-image.parquet")
    with pytest.raises(SigmaError, match="no-image.parquet: no image-bytes column"):
        sources.local_images(tmp_path / "no-image.parquet")
