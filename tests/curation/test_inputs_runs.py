"""Bring your own data, end to end on real photos (tools/real-images) through the real entry point and a
local Ray: a LAION-style URL list (upper-case columns, alt texts) downloaded from loopback, and the same
photos already on disk (the real `img2dataset` command's own output, a folder, a table of image bytes),
curated without downloading. Each keeps the same images as the URL run, and the alt text reaches each
kept sample's KEY.txt and the manifest; the user's files are never changed."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[2]
# small real photos (1280-2560 px), one too small (256 px), and an exact copy of the first: a duplicate
PHOTOS = [
    "mate_nature_Aqua.jpg",
    "mate_nature_FreshFlower.jpg",
    "mate_nature_GreenMeadow.jpg",
    "mate_abstract_Spring.png",
    "mate_nature_YellowFlower.jpg",
    "gnome_vnc-d.webp",
]
COPY = "zz_copy_of_Aqua.jpg"
SETTINGS = ["--profile", "demo", "--set", "curation.download.shard_size=4", "--set", "curation.shard_size=3"]


def alt(name: str) -> str:
    return f"a photo called {name.rsplit('.', 1)[0]}"


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    real = ROOT / ".cache" / "real"
    if not (real / "images").is_dir() or not any((real / "images").iterdir()):
        subprocess.run([str(ROOT / "tools" / "real-images"), str(real)], check=True)
    d = tmp_path_factory.mktemp("photos")
    for name in PHOTOS:
        shutil.copy(real / "images" / name, d / name)
    shutil.copy(real / "images" / PHOTOS[0], d / COPY)
    return d


@pytest.fixture(scope="module")
def server(photos):
    from demo.serve import ImageServer

    with ImageServer(photos) as srv:
        yield srv


@pytest.fixture(scope="module")
def laion(photos, server, tmp_path_factory) -> Path:
    names = sorted(p.name for p in photos.iterdir())
    path = tmp_path_factory.mktemp("list") / "laion.parquet"
    pq.write_table(
        pa.table(
            {
                "URL": [f"{server.url}/{n}" for n in names],
                "TEXT": [alt(n) for n in names],
                "WIDTH": [1024.0] * len(names),
                "HEIGHT": [768.0] * len(names),
                "similarity": [0.3 + i / 100 for i in range(len(names))],
                "hash": list(range(len(names))),
            }
        ),
        path,
    )
    return path


def curate(capsys, *argv) -> tuple[Path, pd.DataFrame, dict, str]:
    """Run the entry point: (out, manifest, the printed summary, what it said on stderr)."""
    from curation import run as cli

    out = Path(argv[argv.index("--out") + 1])
    cli.main([*argv, *SETTINGS])
    said = capsys.readouterr()
    return out, pd.read_parquet(out / "manifest.parquet"), json.loads(said.out.strip().splitlines()[-1]), said.err


def samples(out: Path) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} over the curated shards."""
    found: dict[str, dict[str, bytes]] = {}
    for tar in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t:
                key, ext = m.name.split(".", 1)
                found.setdefault(key, {})[ext] = t.extractfile(m).read()
    return found


def kept(m: pd.DataFrame) -> set[str]:
    return set(m.loc[m.status == "kept", "sha256"])


def digests(folder: Path) -> dict[str, tuple[str, int]]:
    return {
        str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def check_captions(out: Path, m: pd.DataFrame, name_of) -> None:
    """Every kept sample's KEY.txt and manifest caption is its photo's alt text."""
    got = samples(out)
    rows = m[m.status == "kept"]
    assert len(rows) >= 4 and sorted(got) == sorted(rows["key"])
    for _, r in rows.iterrows():
        assert got[r["key"]]["txt"].decode() == r["caption"] == alt(name_of(r))
        assert json.loads(got[r["key"]]["json"])["caption"] == r["caption"]


@pytest.fixture(scope="module")
def by_url(ray_local, tiny_models, laion, tmp_path_factory):
    """The URL run every on-disk kind is compared with."""
    from curation import run as cli

    out = tmp_path_factory.mktemp("by-url") / "out"
    cli.main(["--urls", str(laion), "--out", str(out), *SETTINGS])
    return out, pd.read_parquet(out / "manifest.parquet")


def test_laion_parquet_upper_case_columns_keep_their_alt_text(by_url, laion):
    out, m = by_url
    urls = pq.read_table(laion).to_pandas()
    assert sorted(m["url"]) == sorted(urls["URL"]) and m["key"].is_unique  # every URL once
    name = {u: u.rsplit("/", 1)[1] for u in urls["URL"]}
    check_captions(out, m, lambda r: name[r["url"]])
    by_name = m.assign(name=m["url"].map(name)).set_index("name")
    assert by_name.loc["gnome_vnc-d.webp", "reason"] == "too_small"
    assert by_name.loc[COPY, "reason"] == "duplicate" and by_name.loc[COPY, "dup_of"] == by_name.loc[PHOTOS[0], "key"]
    assert set(by_name.columns) >= {"WIDTH", "HEIGHT", "similarity", "hash"}  # carried, as save_additional_columns
    meta = json.loads(samples(out)[by_name.loc[PHOTOS[0], "key"]]["json"])
    assert meta["similarity"] == by_name.loc[PHOTOS[0], "similarity"] and meta["url"].endswith(PHOTOS[0])


def test_tsv_list_and_a_txt_list_without_captions(by_url, laion, tmp_path, capsys):
    urls = pq.read_table(laion).to_pandas().rename(columns={"URL": "url", "TEXT": "alt"})
    tsv = tmp_path / "urls.tsv"
    urls[["url", "alt", "similarity"]].to_csv(tsv, sep="\t", index=False)
    out, m, _, _ = curate(capsys, "--urls", str(tsv), "--out", str(tmp_path / "tsv"))
    assert kept(m) == kept(by_url[1]) and m["similarity"].notna().all()
    check_captions(out, m, lambda r: r["url"].rsplit("/", 1)[1])
    txt = tmp_path / "urls.txt"
    txt.write_text("\n".join(urls["url"]) + "\n")
    out, m, summary, err = curate(capsys, "--urls", str(txt), "--out", str(tmp_path / "txt"))
    assert len([line for line in err.splitlines() if "no caption column" in line]) == 1  # said once, one line
    assert kept(m) == kept(by_url[1]) and summary["urls"] == 7 and "caption" not in m
    assert not any("txt" in files for files in samples(out).values())


def test_img2dataset_output_is_curated_without_downloading(by_url, laion, server, tmp_path, capsys):
    shards = tmp_path / "i2d"
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    subprocess.run(
        [
            str(Path(sys.executable).parent / "img2dataset"),
            "--url_list",
            str(laion),
            "--input_format",
            "parquet",
            "--url_col",
            "URL",
            "--caption_col",
            "TEXT",
            "--save_additional_columns",
            '["similarity","hash"]',
            "--output_format",
            "webdataset",
            "--output_folder",
            str(shards),
            "--resize_mode",
            "no",
            "--disable_all_reencoding",
            "True",
            "--processes_count",
            "1",
            "--thread_count",
            "4",
            "--number_sample_per_shard",
            "4",
            "--enable_wandb",
            "False",
        ],
        check=True,
        env=env,
        capture_output=True,
        cwd=tmp_path,
    )
    assert len(list(shards.glob("*.tar"))) == 2
    before, requests = digests(shards), len(server.log)
    out, m, summary, _ = curate(capsys, "--images", str(shards), "--out", str(tmp_path / "out"))
    assert len(server.log) == requests and not list((out / "downloads").glob("*_stats.json"))  # nothing fetched
    assert digests(shards) == before  # the user's shards are read, never changed or removed
    assert summary["images"] == len(m) == 7 and kept(m) == kept(by_url[1])  # the same images kept as by URL
    assert m["source"].str.match(rf"^{shards}/0000[01]\.tar::\d+\.jpg$").all()
    assert sorted(m["url"]) == sorted(by_url[1]["url"])  # the sidecar .json's URL
    name = {u: u.rsplit("/", 1)[1] for u in m["url"]}
    check_captions(out, m, lambda r: name[r["url"]])
    assert m["similarity"].notna().all()  # the sidecar's extra columns carried


def test_folder_of_images_with_txt_captions(by_url, photos, tmp_path, capsys):
    folder = tmp_path / "mine"
    for i, p in enumerate(sorted(photos.iterdir())):
        dest = folder / ("a" if i % 2 else "b") / p.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, dest)
        dest.with_suffix(".txt").write_text(alt(p.name))
    before = digests(folder)
    out, m, summary, _ = curate(capsys, "--images", str(folder), "--out", str(tmp_path / "out"))
    assert digests(folder) == before and len(m) == 7 and m["url"].isna().all()
    assert sorted(m["source"]) == sorted(str(p) for p in folder.rglob("*") if p.is_file() and p.suffix != ".txt")
    assert kept(m) == kept(by_url[1])
    check_captions(out, m, lambda r: Path(r["source"]).name)
    assert curate(capsys, "--images", str(folder), "--out", str(out))[2] == summary  # a rerun: finished, as it was
    shutil.copy(photos / PHOTOS[1], folder / "new.jpg")
    with pytest.raises(SystemExit):  # another set of files is another input: refused (fingerprint.json)
        curate(capsys, "--images", str(folder), "--out", str(out))
    assert "made with another --images" in capsys.readouterr().err


def test_table_of_image_bytes(by_url, photos, tmp_path, capsys):
    """A parquet in the layout `datasets` writes for an Image feature ({bytes, path} structs)."""
    names = sorted(p.name for p in photos.iterdir())
    image = pa.array(
        [{"bytes": (photos / n).read_bytes(), "path": n} for n in names],
        pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )
    features = {"image": {"_type": "Image"}, "text": {"dtype": "string", "_type": "Value"}}
    meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    table = pa.table({"image": image, "text": [alt(n) for n in names], "name": names}).replace_schema_metadata(meta)
    path = tmp_path / "data" / "train.parquet"
    path.parent.mkdir()
    pq.write_table(table, path, row_group_size=3)
    before = digests(path.parent)
    out, m, _, _ = curate(capsys, "--images", str(path), "--out", str(tmp_path / "out"))
    assert digests(path.parent) == before
    assert m["source"].tolist() == [f"{path}#{i}" for i in range(7)]
    assert kept(m) == kept(by_url[1])
    check_captions(out, m, lambda r: r["name"])
    assert not list((out / "downloads").glob("*.tar"))  # the run's own copies of the bytes, freed after writing
