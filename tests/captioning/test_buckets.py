"""captioning/recaption from curated shards in a bucket into a bucket (moto's S3 server on loopback, real
Ray): the same caption rows as on disk, kill -9 and a rerun resume from the bucket, never a local folder
named `s3:`, and no credential in anything written."""

from __future__ import annotations

import json
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
    ray_local, make_cfg, make_shards, bucket, s3_counted, tmp_path, monkeypatch
):
    make_shards(tmp_path / "cur", 3, 4)
    upload(tmp_path / "cur", f"{bucket}/cur")
    # a decoy where a lost `//` would look: `s3://b/cur/shards` must never read ./s3:/b/cur/shards
    make_shards(tmp_path / "s3:" / bucket[5:] / "cur", 1, 1)
    monkeypatch.chdir(tmp_path)
    cfg = make_cfg()
    disk = recaption.run(cfg, str(tmp_path / "cur" / "shards"), str(tmp_path / "caps"), "original")
    s3_counted.fail("GET", 2, "slowdown", path="/cur/shards/")  # throttled reads of the tars, in Ray tasks
    got = recaption.run(cfg, f"{bucket}/cur/shards", f"{bucket}/caps", "original")
    assert disk["written"] == got["written"] == 3 and got["captions"] == disk["captions"] == 12
    assert got["storage_retries"] == {"throttled": 2, "server_errors": 0, "dropped": 0}  # retried, counted
    assert "storage_retries" not in disk  # a run on disk: its summary as before
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


def _main(capsys, *argv: str) -> tuple[int, str, str]:
    """recaption's entry point in this process: (exit code, stdout, stderr)."""
    try:
        recaption.main(["--profile", "demo", "--captioner", "original", *argv])
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    said = capsys.readouterr()
    return code, said.out, said.err.strip()


def test_store_faults_up_front_are_one_line_and_a_dry_run_writes_nothing(
    make_shards, bucket, s3_counted, capsys, tmp_path
):
    """A missing bucket, an unreachable endpoint: one line naming the URL and the cause before any work (a dry
    run too); a dry run into a bucket only reads."""
    from tests.curation.test_buckets_in import _closed_port

    make_shards(tmp_path / "cur", 2, 2)
    upload(tmp_path / "cur", f"{bucket}/cur")
    shards, caps = f"{bucket}/cur/shards", f"{bucket}/caps"
    dead = ["--set", f"storage.s3.endpoint_url=http://127.0.0.1:{_closed_port()}"]
    cases = [  # (argv, the URL the line names, its cause)
        (["--shards", "s3://no-such-bucket-sf/cur/shards", "--out", caps], "s3://no-such-bucket-sf/cur", "bucket"),
        (["--shards", shards, "--out", "s3://no-such-bucket-sf/caps"], "s3://no-such-bucket-sf/caps", "bucket"),
        (["--shards", shards, "--out", caps, *dead], shards, "does not answer"),
    ]
    for argv, named, cause in cases:
        for dry in ([], ["--dry-run"]):
            code, said, err = _main(capsys, *argv, *dry)
            assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), (argv, dry, err)
            assert named in err and cause in err and S3_SECRET not in err + said, err
    before = storage.resolve(bucket).files()
    s3_counted.requests.clear()
    code, said, err = _main(capsys, "--shards", shards, "--out", caps, "--dry-run")
    assert code == 0 and json.loads(said)["todo"] == [f"{shards}/00000.tar", f"{shards}/00001.tar"], err
    assert s3_counted.requests and not s3_counted.writes() and storage.resolve(bucket).files() == before


def test_store_gone_mid_run_is_one_line(ray_local, make_shards, bucket, s3_counted, capsys, tmp_path):
    """The store stops answering once the run has started (every read of a tar, in the Ray tasks, dropped):
    after botocore's retries the run ends with one line naming the object and the cause, no traceback."""
    make_shards(tmp_path / "cur", 2, 2)
    upload(tmp_path / "cur", f"{bucket}/cur")
    s3_counted.fail("GET", 1000, "drop", path="/cur/shards/")
    code, said, err = _main(
        capsys, "--shards", f"{bucket}/cur/shards", "--out", f"{bucket}/caps", "--set", "storage.s3.retries=1"
    )
    assert code == 2 and "Traceback" not in err, err[-3000:]
    line = err.splitlines()[-1]
    assert line.startswith(f"error: {bucket}/cur/shards/0000") and "does not answer" in line, line
    assert S3_SECRET not in err + said
