"""Curation's inputs from a bucket (a real S3 API: moto's server on loopback): URL lists, img2dataset
tars curated in place (a bounded number of requests per tar, whatever its member count; nothing of
the user's tars copied but kept images), a folder of images, a table, --dedup-against; and the faults
a bucket adds (missing bucket or key, access denied, unreachable endpoint), each one line, fast,
before any work, never with a credential in it. A dry run writes nothing to the bucket."""

from __future__ import annotations

import gzip
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation import inputs, sources
from shards import fingerprint, storage
from tests.conftest import S3_SECRET

ROOT = Path(__file__).resolve().parents[2]
RUN = [sys.executable, str(ROOT / "curation" / "run.py")]
URLS = [f"http://img.example/{i}.jpg" for i in range(5)]
ALT = [f"alt text {i}" for i in range(5)]
SETTINGS = ["--profile", "demo", "--set", "curation.shard_size=3"]
# img2dataset-style tars of different sizes: 2 samples, and 12 (6 photos, each twice: duplicates)
TARS = [["square-1k.jpg", "small.jpg"], ["hires-2k.jpg", "wide-1k.webp", "portrait-1k.png", "panorama.jpg"]]
TARS[1] = (TARS[1] + ["rotated.jpg", "flat.png"]) * 2


def put(url: str, data: bytes) -> None:
    storage.resolve(url).write_object(data)


def objects(bucket: str) -> dict[str, int]:
    b = storage.resolve(bucket)
    return {loc.relative_to(b): size for loc, size in sources._bucket_listing(b).items()}


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def i2d_tar(image_dir: Path, names: list[str], first: int) -> bytes:
    """A tar as img2dataset writes it: KEY.jpg/.png/.webp, KEY.txt (caption), KEY.json (url, status, ...)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i, name in enumerate(names):
            key = f"{first + i:09d}"
            ext = name.rsplit(".", 1)[1]
            meta = {"url": f"http://photos.example/{name}", "key": key, "status": "success", "caption": f"alt {name}"}
            for member, data in (
                (f"{key}.{ext}", (image_dir / name).read_bytes()),
                (f"{key}.txt", f"alt {name}".encode()),
                (f"{key}.json", json.dumps(meta).encode()),
            ):
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def put_tars(image_dir: Path, prefix: str, groups=TARS) -> list[str]:
    urls, first = [], 0
    for i, names in enumerate(groups):
        urls.append(f"{prefix}/{i:05d}.tar")
        put(urls[-1], i2d_tar(image_dir, names, first))
        first += len(names)
    return urls


def run_main(capsys, *argv) -> tuple[int, str, str, float]:
    """The entry point in this process: (exit code, stdout, stderr, seconds)."""
    from curation import run

    t0 = time.time()
    try:
        run.main(list(argv))
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    said = capsys.readouterr()
    return code, said.out, said.err.strip(), time.time() - t0


# ---------------------------------------------------------------------------------------------
# Inputs read from a bucket (no Ray)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["parquet", "csv.gz", "tsv", "jsonl", "txt.gz"])
def test_url_list_formats_in_a_bucket(bucket, tmp_path, fmt):
    frame = pd.DataFrame({"url": URLS, "alt": ALT, "score": [1, 2, 3, 4, 5]})
    base = fmt.removesuffix(".gz")
    data = {
        "parquet": lambda: parquet_bytes(pa.Table.from_pandas(frame)),
        "csv": lambda: frame.to_csv(index=False).encode(),
        "tsv": lambda: frame.to_csv(index=False, sep="\t").encode(),
        "jsonl": lambda: frame.to_json(orient="records", lines=True).encode(),
        "txt": lambda: ("\n".join(URLS) + "\n").encode(),
    }[base]()
    put(f"{bucket}/lists/urls.{fmt}", gzip.compress(data) if fmt.endswith(".gz") else data)
    found = inputs.url_list(f"{bucket}/lists/urls.{fmt}")
    assert found.describe()["rows"] == 5 and str(found.files[0]) == f"{bucket}/lists/urls.{fmt}"
    assert found.split(tmp_path / "in", 3) == 2  # input shards on disk
    assert found.split(storage.resolve(f"{bucket}/work/in"), 3) == 2  # ... or in the bucket
    t = pd.concat([pd.read_parquet(p) for p in sorted((tmp_path / "in").glob("*.parquet"))])
    assert t["url"].tolist() == URLS and t["key"].tolist() == [f"{i:010d}" for i in range(5)]
    if base != "txt":
        assert found.caption_col == "alt" and t["caption"].tolist() == ALT
    assert {"work/in/00000.parquet", "work/in/00001.parquet", "work/in/.complete"} <= set(objects(bucket))


def test_folder_glob_and_braces_of_lists_in_a_bucket(bucket):
    for i in range(3):
        put(f"{bucket}/parts/part-{i}.csv", pd.DataFrame({"URL": URLS[i : i + 1]}).to_csv(index=False).encode())
    put(f"{bucket}/parts/README.md", b"not a list")
    whole = [f"{bucket}/parts/part-{i}.csv" for i in range(3)]
    for spec in (f"{bucket}/parts", f"{bucket}/parts/", f"{bucket}/parts/*.csv", f"{bucket}/parts/part-{{0..2}}.csv"):
        assert list(map(str, inputs.url_list(spec).files)) == whole, spec
    with pytest.raises(inputs.NotFound, match="not found"):
        inputs.url_list(f"{bucket}/parts/nothing-*.csv")
    with pytest.raises(inputs.NotFound, match="not found"):
        inputs.url_list(f"{bucket}/nowhere.parquet")


def test_images_in_a_bucket_every_kind(bucket, image_dir, tmp_path):
    tars = put_tars(image_dir, f"{bucket}/i2d")
    for spec in (f"{bucket}/i2d/{{00000..00001}}.tar", f"{bucket}/i2d/*.tar", f"{bucket}/i2d", tars[0]):
        found = sources.local_images(spec, tmp_path / "out")
        assert found.kind == "shards" and list(map(str, found.files)) == tars[: len(found.files)], spec
    found = sources.local_images(f"{bucket}/i2d", tmp_path / "out")
    work = storage.resolve(f"{bucket}/run/_work")
    assert found.split(work / "input", 100) == 2  # one input shard per tar
    rows = list(found.shard_rows(work, work / "downloads", 1, None))
    assert len(rows) == len(TARS[1]) and all(r["src"] == tars[1] for r in rows)
    with tarfile.open(fileobj=io.BytesIO(storage.resolve(tars[1]).read_bytes())) as t:
        images = [t.extractfile(m).read() for m in t if m.name.endswith((".jpg", ".png", ".webp"))]
    assert [r["data"] for r in rows] == images  # the bytes, read in the shard's one pass, in member order
    first = pd.read_parquet(io.BytesIO((work / "input" / "00000.parquet").read_bytes()))
    assert first["caption"].tolist() == [f"alt {n}" for n in TARS[0]]
    assert first["source"].tolist()[0] == f"{tars[0]}::000000000.jpg"

    for i, name in enumerate(["square-1k.jpg", "small.jpg", "flat.png"]):  # a folder of images, .txt captions
        put(f"{bucket}/photos/sub/{i}-{name}", (image_dir / name).read_bytes())
    put(f"{bucket}/photos/sub/1-small.txt", b"a small one")
    found = sources.local_images(f"{bucket}/photos")
    assert found.kind == "folder" and found.split(storage.resolve(f"{bucket}/f/_work/input"), 2) == 2
    t = pd.read_parquet(io.BytesIO(storage.resolve(f"{bucket}/f/_work/input/00000.parquet").read_bytes()))
    assert t["caption"].tolist() == [None, "a small one"]
    assert found.fingerprint()["--images"] == f"folder {fingerprint.listing(found._item_files())}"  # one LIST

    table = pa.table({"image": [(image_dir / "square-1k.jpg").read_bytes()], "TEXT": ["a square"], "n": [7]})
    put(f"{bucket}/table/t.parquet", parquet_bytes(table))
    found = sources.local_images(f"{bucket}/table/t.parquet")
    assert (found.kind, found.image_col, found.caption_col, found.describe()["rows"]) == ("table", "image", "TEXT", 1)

    with pytest.raises(inputs.NotFound, match="no images found"):
        sources.local_images(f"{bucket}/i2d/{{00007..00009}}.tar")
    with pytest.raises(Exception, match="overlaps --out"):
        sources.local_images(f"{bucket}/i2d", f"{bucket}/i2d/00000.tar")


# ---------------------------------------------------------------------------------------------
# Faults: one line naming the URL and the cause, before any work, in seconds
# ---------------------------------------------------------------------------------------------


def test_missing_bucket_key_and_unreachable_endpoint_fail_in_one_line(bucket, capsys, tiny_models, tmp_path):
    put(f"{bucket}/urls.parquet", parquet_bytes(pa.table({"url": URLS})))
    out = str(tmp_path / "out")
    cases = [  # (argv, the URL the line names, its cause)
        (["--urls", "s3://no-such-bucket-sf/urls.parquet", "--out", out], 1, "the bucket does not exist"),
        (["--urls", f"{bucket}/nope.parquet", "--out", out], 1, "not found"),
        (["--images", f"{bucket}/nope/{{00000..00003}}.tar", "--out", out], 1, "no images found"),
        (["--urls", f"{bucket}/urls.parquet", "--out", "s3://no-such-bucket-sf/out"], 3, "the bucket does not exist"),
        (["--urls", f"{bucket}/urls.parquet", "--out", out, "--dedup-against", f"{bucket}/old"], 5, "not a finished"),
    ]
    for argv, named, cause in cases:
        for dry in ([], ["--dry-run"]):
            code, said, err, seconds = run_main(capsys, *argv, *SETTINGS, *dry)
            if dry and cause in ("not found", "no images found"):  # a dry run plans without the data
                assert code == 0 and json.loads(said)["not_checked"][0].startswith(argv[named]), err
                continue
            assert code == 2 and len(err.splitlines()) == 1 and cause in err and seconds < 30, (argv, dry, err)
            assert err.startswith("error: ") and argv[named] in err, err
            assert S3_SECRET not in err + said
    assert not (tmp_path / "out").exists()

    dead = f"http://127.0.0.1:{_closed_port()}"  # nothing listens: the probe fails in seconds, not minutes
    for dry in ([], ["--dry-run"]):
        code, said, err, seconds = run_main(
            capsys, "--urls", f"{bucket}/urls.parquet", "--out", out, *SETTINGS, "--set",
            f"storage.s3.endpoint_url={dead}", *dry,
        )  # fmt: skip
        assert code == 2 and len(err.splitlines()) == 1 and seconds < 20, (err, seconds)
        assert f"{bucket}/urls.parquet" in err and "does not answer" in err and S3_SECRET not in err, err


def test_store_gone_mid_run_is_one_line(bucket, s3_counted, capsys, tiny_models):
    """The store stops answering once the run has started (every write under --out dropped): after botocore's
    retries the run ends with one line naming the object and the cause, no traceback."""
    put(f"{bucket}/urls.parquet", parquet_bytes(pa.table({"url": URLS})))
    s3_counted.fail("PUT", 1000, "drop", path="/cur/")
    argv = ["--urls", f"{bucket}/urls.parquet", "--out", f"{bucket}/cur", *SETTINGS, "--set", "storage.s3.retries=2"]
    code, said, err, _ = run_main(capsys, *argv)
    assert code == 2 and "Traceback" not in err, err[-3000:]
    line = err.splitlines()[-1]
    assert line.startswith(f"error: {bucket}/cur/") and "does not answer" in line and S3_SECRET not in err, line


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_access_denied_is_one_line_without_the_credentials(bucket, s3_server, tiny_models, tmp_path, monkeypatch):
    """moto's IAM mode: a user without any policy is refused every S3 action (AccessDenied, 403)."""
    import boto3
    import moto.settings

    put(f"{bucket}/urls.parquet", parquet_bytes(pa.table({"url": URLS})))
    iam = boto3.client("iam", endpoint_url=s3_server, region_name="us-east-1")
    user = f"denied-{os.getpid()}-{time.time_ns()}"
    iam.create_user(UserName=user)
    key = iam.create_access_key(UserName=user)["AccessKey"]
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # the server checks every request now
    env = {**os.environ, "AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
    for dry in ([], ["--dry-run"]):
        t0 = time.time()
        r = subprocess.run(
            RUN + ["--urls", f"{bucket}/urls.parquet", "--out", str(tmp_path / "out"), *SETTINGS, *dry],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        err = r.stderr.strip()
        assert r.returncode == 2 and len(err.splitlines()) == 1 and time.time() - t0 < 60, err
        assert f"{bucket}/urls.parquet" in err and "access denied" in err, err
        for secret in (key["SecretAccessKey"], key["AccessKeyId"], S3_SECRET):
            assert secret not in r.stdout + r.stderr
    assert not (tmp_path / "out").exists()


def test_dry_run_reads_only_and_writes_nothing_to_the_bucket(bucket, s3_counted, capsys, image_dir, tiny_models):
    put(f"{bucket}/urls.parquet", parquet_bytes(pa.table({"URL": URLS, "TEXT": ALT})))
    put_tars(image_dir, f"{bucket}/i2d")
    before = objects(bucket)
    s3_counted.requests.clear()
    endpoint = ["--set", f"storage.s3.endpoint_url={s3_counted.url}"]
    for argv in (
        ["--urls", f"{bucket}/urls.parquet", "--out", f"{bucket}/out"],
        ["--images", f"{bucket}/i2d/{{00000..00001}}.tar", "--out", f"{bucket}/out2"],
        ["--urls", f"{bucket}/later.parquet", "--out", f"{bucket}/out3"],  # not there yet: not_checked
    ):
        code, said, err, _ = run_main(capsys, *argv, *SETTINGS, *endpoint, "--dry-run")
        plan = json.loads(said)
        assert code == 0 and plan["out"] == argv[3], err
    assert plan["not_checked"] == [f"{bucket}/later.parquet: URL list not found"]
    assert s3_counted.requests and not s3_counted.writes()  # it read (headers, listings), wrote nothing
    assert objects(bucket) == before


def test_range_reader_reads_many_pieces_of_an_object_in_few_requests(bucket, s3_counted):
    data = os.urandom(3 << 20)
    put(f"{bucket}/big.bin", data)
    loc = storage.resolve(f"{bucket}/big.bin", {"s3": {"endpoint_url": s3_counted.url}})
    pieces = [(loc, offset, 1000) for offset in range(0, len(data) - 1000, 30_000)]  # 105 pieces
    reader = storage.RangeReader(pieces, span=1 << 20)
    assert all(reader.read(loc, o, n) == data[o : o + n] for _, o, n in pieces)
    assert s3_counted.count("GET", "/big.bin") == 3  # one per MiB spanned, not one per piece
    assert reader.read(loc, 5, 7) == data[5:12]  # a piece not announced is still read


# ---------------------------------------------------------------------------------------------
# Whole runs (Ray): a URL list in a bucket; img2dataset tars in a bucket curated in place
# ---------------------------------------------------------------------------------------------


def manifest(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "manifest.parquet").sort_values("key").reset_index(drop=True)


def curated_samples(out: Path) -> dict[str, dict[str, bytes]]:
    found: dict[str, dict[str, bytes]] = {}
    for tar in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t:
                key, ext = m.name.split(".", 1)
                found.setdefault(key, {})[ext] = t.extractfile(m).read()
    return found


def without_source(out: Path) -> dict[str, dict[str, bytes]]:
    """The curated samples, each .json without its `source` (the input's path or URL)."""
    found = curated_samples(out)
    for files in found.values():
        meta = json.loads(files["json"])
        del meta["source"]
        files["json"] = json.dumps(meta).encode()
    return found


def test_url_list_in_a_bucket_is_curated(ray_local, tiny_models, server, bucket, tmp_path, capsys):
    names = ["square-1k.jpg", "small.jpg", "wide-1k.webp", "exact-copy.jpg"]
    table = pa.table({"URL": [f"{server.url}/{n}?b=1" for n in names], "TEXT": [f"alt {n}" for n in names]})
    put(f"{bucket}/lists/part-0.parquet", parquet_bytes(table))
    code, said, err, _ = run_main(capsys, "--urls", f"{bucket}/lists", "--out", str(tmp_path / "out"), *SETTINGS)
    assert code == 0, err
    m = manifest(tmp_path / "out")
    assert m["url"].tolist() == table["URL"].to_pylist() and m["caption"].tolist() == table["TEXT"].to_pylist()
    assert (m.status == "kept").sum() == 2 and json.loads(said.splitlines()[-1])["kept"] == 2
    assert sorted(curated_samples(tmp_path / "out")) == sorted(m.loc[m.status == "kept", "key"])

    # that run, as a finished run in the bucket (its manifest and dedup index): --dedup-against it there
    for f in [tmp_path / "out" / "manifest.parquet", *sorted((tmp_path / "out" / "dedup_index").glob("*"))]:
        put(f"{bucket}/first/{f.relative_to(tmp_path / 'out')}", f.read_bytes())
    again = pa.table({"URL": [f"{server.url}/{n}?b=2" for n in names[:2]], "TEXT": ["again 1", "again 2"]})
    put(f"{bucket}/again.parquet", parquet_bytes(again))
    argv = ["--urls", f"{bucket}/again.parquet", "--out", str(tmp_path / "2nd"), "--dedup-against", f"{bucket}/first"]
    code, _, err, _ = run_main(capsys, *argv, *SETTINGS)
    assert code == 0, err
    m2 = manifest(tmp_path / "2nd")
    assert m2.loc[0, "reason"] == "duplicate" and m2.loc[0, "dup_of"] == f"first/{m.loc[0, 'key']}"
    assert m2.loc[1, "reason"] == "too_small"


@pytest.fixture(scope="module")
def local_tars(image_dir, tmp_path_factory) -> Path:
    """The same img2dataset tars on disk: what the bucket's are compared with."""
    d = tmp_path_factory.mktemp("i2d")
    first = 0
    for i, names in enumerate(TARS):
        (d / f"{i:05d}.tar").write_bytes(i2d_tar(image_dir, names, first))
        first += len(names)
    return d


def test_tars_in_a_bucket_curated_in_place(
    ray_local, tiny_models, image_dir, local_tars, bucket, s3_counted, tmp_path, capsys
):
    """Each tar: a bounded number of requests whatever its member count (two streamed passes, the kept
    images read back in coalesced ranges); the user's tars never written; nothing of a rejected image
    copied; the same decisions as the same tars on disk."""
    tars = put_tars(image_dir, f"{bucket}/i2d")
    before = objects(bucket)
    one = ["--set", "curation.shard_size=100"]  # each tar's kept images in one curated shard
    code, _, err, _ = run_main(capsys, "--images", str(local_tars), "--out", str(tmp_path / "disk"), *SETTINGS, *one)
    assert code == 0, err
    s3_counted.requests.clear()
    argv = ["--images", f"{bucket}/i2d/{{00000..00001}}.tar", "--out", str(tmp_path / "out"), *SETTINGS, *one]
    code, _, err, _ = run_main(capsys, *argv)
    assert code == 0, err
    disk, m = manifest(tmp_path / "disk"), manifest(tmp_path / "out")
    columns = [c for c in m.columns if c != "source"]
    pd.testing.assert_frame_equal(m[columns], disk[columns])  # the same rows, decisions and scores
    assert m["source"].tolist() == [s.replace(str(local_tars), f"{bucket}/i2d") for s in disk["source"]]
    kept = m.loc[m.status == "kept", "key"].tolist()
    assert 3 <= len(kept) < len(m) and without_source(tmp_path / "out") == without_source(tmp_path / "disk")

    assert not s3_counted.writes() and objects(bucket) == before  # the user's bucket is only read
    assert not list((tmp_path / "out").rglob("*.tar")) or all(
        p.parent.name == "shards" for p in (tmp_path / "out").rglob("*.tar")
    )  # no copy of a user's tar (nor of its rejected images) anywhere in the output
    per_tar = {t: (s3_counted.count("GET", t[4:]), s3_counted.count("HEAD", t[4:])) for t in tars}  # /bucket/key
    # GET: the split's streamed pass, the download task's, the kept images' coalesced range, the rejected
    # thumbnails' (a tar feeding k curated shards: k ranges); HEAD: each pass's size, the fingerprint's
    assert all(get <= 4 and head <= 4 for get, head in per_tar.values()), per_tar
    assert per_tar[tars[0]] == per_tar[tars[1]], per_tar  # 6x the members, the same requests


def test_in_place_run_killed_and_rerun(ray_local, tiny_models, image_dir, bucket, tmp_path):
    """SIGKILL the driver mid-run (the tars split, some maybe scored); the rerun redoes nothing finished,
    loses nothing and keeps nothing twice."""
    groups = [[n] for n in (TARS[0] + TARS[1])[:8]]  # a tar per image: many small units of work
    put_tars(image_dir, f"{bucket}/one", groups)
    out = tmp_path / "out"
    argv = RUN + ["--images", f"{bucket}/one", "--out", str(out), *SETTINGS]
    argv += ["--set", "curation.aesthetic_resources.batch_size=1"]  # Ray Data holds partial batches until upstream ends
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    with open(tmp_path / "killed.log", "wb") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=log, start_new_session=True)
    work, deadline = out / "_work", time.time() + 300
    while not (work / "input" / ".complete").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(10)  # Ray starts, the first tars are read
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (work / "input" / ".complete").exists() and not (out / "manifest.parquet").exists()
    done = {p: p.stat().st_mtime_ns for p in [*work.glob("input/*.parquet"), *work.glob("scored/*.parquet")]}
    r = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in done} == done  # the split and finished tars not redone
    m = manifest(out)
    assert len(m) == len(groups) and m["key"].is_unique
    kept = m.loc[m.status == "kept", "key"].tolist()
    assert kept and sorted(curated_samples(out)) == sorted(kept)  # nothing lost, nothing twice
    assert not list(out.rglob("*.tmp"))
