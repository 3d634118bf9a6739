"""captioning/recaption from curated shards in a bucket into a bucket (moto's S3 server on loopback, real
Ray): the same caption rows as on disk, kill -9 and a rerun resume from the bucket, never a local folder
named `s3:`, and no credential in anything written."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq

from captioning import recaption
from shards import format as fmt
from shards import storage
from tests.captioning.test_pipeline import ENV, _cli
from tests.conftest import S3_SECRET

ROOT = Path(__file__).resolve().parents[2]


def upload(folder: Path, url: str) -> None:
    """A local folder's files into the bucket under `url`, as `aws s3 cp --recursive` would."""
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        storage.resolve(f"{url}/{f.relative_to(folder).as_posix()}").upload(f)


def table(loc) -> object:
    with storage.resolve(str(loc)).open("rb") as f:
        return pq.read_table(f)


def secrets_in(bucket: str) -> list[str]:
    return [str(p) for p in storage.resolve(bucket).files() if S3_SECRET.encode() in p.read_bytes()]


def test_original_captions_from_a_bucket_equal_disk_and_no_s3_folder_is_read(
    ray_local, make_cfg, make_shards, bucket, tmp_path, monkeypatch
):
    make_shards(tmp_path / "cur", 3, 4)
    upload(tmp_path / "cur", f"{bucket}/cur")
    # a decoy where a lost `//` would look: `s3://b/cur/shards` must never read ./s3:/b/cur/shards
    make_shards(tmp_path / "s3:" / bucket[5:] / "cur", 1, 1)
    monkeypatch.chdir(tmp_path)
    cfg = make_cfg()
    disk = recaption.run(cfg, str(tmp_path / "cur" / "shards"), str(tmp_path / "caps"), "original")
    got = recaption.run(cfg, f"{bucket}/cur/shards", f"{bucket}/caps", "original")
    assert disk["written"] == got["written"] == 3 and got["captions"] == disk["captions"] == 12
    for i in range(3):
        a, b = table(tmp_path / "caps" / f"{i:05d}.parquet"), table(f"{bucket}/caps/{i:05d}.parquet")
        assert a.equals(b) and a.schema.metadata == b.schema.metadata  # rows, and the source size recorded
    names = [p.name for p in storage.resolve(f"{bucket}/caps").iterdir()]
    assert names == ["00000.parquet", "00001.parquet", "00002.parquet", "fingerprint.json", "report.html"]
    again = recaption.run(cfg, f"{bucket}/cur/shards/{{00000..00002}}.tar", f"{bucket}/caps", "original")
    assert again["skipped"] == 3 and again["written"] == 0
    assert secrets_in(bucket) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["caps", "cur", "s3:"]  # nothing new here


def test_bucket_to_bucket_resumes_after_kill(ray_local, cap_models, make_cfg, make_shards, bucket, tmp_path):
    """Kill a run once some shards are written to the bucket; the rerun skips them and leaves no other object."""
    n = 6
    make_shards(tmp_path / "cur", n, 4)
    upload(tmp_path / "cur", f"{bucket}/cur")
    capdir = f"{bucket}/caps"
    overrides = ["captioning.captioners.hf.max_new_tokens=48", "captioning.captioners.hf.resources.batch_size=4"]
    cmd = _cli(
        cap_models, "--shards", f"{bucket}/cur/shards", "--out", capdir, *[a for o in overrides for a in ("--set", o)]
    )
    env = {**ENV, "RAY_raylet_start_wait_time_s": "180"}  # its own local Ray, on a busy machine
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    fs = storage.resolve(bucket).fs
    try:
        deadline = time.time() + 600  # a busy machine: Ray and the tiny models start slowly
        while time.time() < deadline and not fs.glob(f"{capdir[5:]}/*.parquet") and proc.poll() is None:
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started (its own session)
        proc.wait()
    log = proc.stdout.read()
    first = {p.name: p.info()["etag"] for p in storage.resolve(capdir).glob("*.parquet")}
    assert 1 <= len(first) < n, log.decode()[-3000:]

    summary = recaption.run(make_cfg(*overrides), f"{bucket}/cur/shards/{{00000..00005}}.tar", capdir)
    assert summary["skipped"] == len(first) and summary["written"] == n - len(first)
    names = [p.name for p in storage.resolve(capdir).iterdir()]
    assert names == [fmt.caption_file("", f"{i:05d}.tar").name for i in range(n)] + ["fingerprint.json", "report.html"]
    assert {name: storage.resolve(f"{capdir}/{name}").info()["etag"] for name in first} == first  # untouched
    for i in range(n):
        assert table(f"{capdir}/{i:05d}.parquet").num_rows == 4
    assert secrets_in(bucket) == [] and S3_SECRET.encode() not in log
    assert not list(tmp_path.glob("s3*")) and not (ROOT / "s3:").exists()
