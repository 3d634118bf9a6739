"""encoding/encode from a bucket into a bucket (moto's S3 server on loopback, real Ray): the same samples as
on disk, kill -9 and a rerun resume from the bucket, a caption table in a bucket, a two-node Ray cluster
that writes nothing outside the bucket, Ray's temp folder and the model cache, and no credential in
anything written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from encoding import encode
from shards import encoded, storage
from tests.conftest import S3_SECRET
from tests.shards.synthetic import ROOT, sample, write_curated

# 8 shards of 3 samples (one of them not in the 256 tier), ~20 kB a sample: tars roll every 2 samples
SHARDS = [[sample(10 * s + i, 300 + 10 * i, 260) for i in range(3)] + [sample(10 * s + 9, 100, 100)] for s in range(8)]
SETS = ["encode.shard_bytes=40000", "encode.vae_resources.batch_size=2"]
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}


def _cfg(models, *extra: str):
    from common import config

    return config.load(
        ROOT / "pipelines.yaml",
        "demo",
        [f"models.t5={models['t5']}", f"models.vae={models['vae']}", *SETS, *extra],
    )


def _cli(models, images: str, captions: str, out: str) -> list[str]:
    sets = [f"models.t5={models['t5']}", f"models.vae={models['vae']}", *SETS]
    return [
        sys.executable,
        str(ROOT / "encoding" / "encode"),
        *("--images", images, "--captions", captions, "--out", out, "--tier", "256", "--profile", "demo"),
        *[a for s in sets for a in ("--set", s)],
    ]


def upload(folder: Path, url: str) -> None:
    """A local folder's files into the bucket under `url`, as `aws s3 cp --recursive` would."""
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        storage.resolve(f"{url}/{f.relative_to(folder).as_posix()}").upload(f)


def contents(encdir) -> dict:
    """What an ENCDIR holds, independent of which tar a sample landed in: index rows (without `shard`),
    every sample's tar members and caption-set rows by key, info.json, the null caption."""
    loc = encdir if isinstance(encdir, storage.Loc) else storage.resolve(encdir)
    with (loc / encoded.INDEX).open("rb") as f:
        index = pq.read_table(f).to_pandas().drop(columns=["shard"]).sort_values("key").reset_index(drop=True)
    samples: dict[str, dict] = {}
    for tar in encoded.committed_shards(loc):
        with tar.open("rb") as f, tarfile.open(fileobj=f) as t:
            for m in t:
                key, _, suffix = m.name.partition(".")
                samples.setdefault(key, {})[suffix] = t.extractfile(m).read()
        for name, side in encoded.set_files(tar).items():
            for row in encoded.read_set(side):
                samples[row["key"]][f"set-{name}"] = row
    info = json.loads((loc / encoded.INFO).read_text())
    for facts in info.get("caption_sets", {}).values():
        facts.pop("from", None)  # where the captions were read: the run's --captions, a path or a URL
    return dict(index=index, samples=samples, info=info, null=(loc / info["null_caption"]).read_bytes())


def _close(x: bytes | None, y: bytes | None, unpack) -> bool:
    """Tensors equal up to fp16 rounding: T5 and the VAE batch samples differently after a resume, and a
    batch's composition moves float results by an ulp or so."""
    if x is None or y is None:
        return x is y
    a, b = unpack(x), unpack(y)
    return a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), rtol=1e-2, atol=1e-3) for k in a)


def assert_same(a: dict, b: dict) -> None:
    """Same rows, same samples: every member and set row equal (tensors up to fp16 rounding)."""
    pd.testing.assert_frame_equal(a["index"], b["index"])
    assert a["samples"].keys() == b["samples"].keys() and len(a["samples"]) > 0
    fp16 = lambda data: {"t5": torch.frombuffer(bytearray(data), dtype=torch.float16)}  # a set row: raw fp16 features
    for key, x in a["samples"].items():
        y = b["samples"][key]
        assert x.keys() == y.keys(), key
        for member in x:
            if member.endswith("safetensors"):
                assert _close(x[member], y[member], encoded.unpack), (key, member)
            elif member.startswith("set-"):
                rx, ry = dict(x[member]), dict(y[member])
                assert _close(rx.pop("t5"), ry.pop("t5"), fp16), (key, member)
                assert rx == ry, (key, member)
            else:
                assert x[member] == y[member], (key, member)
    assert a["info"] == b["info"] and a["null"] == b["null"]


def everything_written(bucket: str) -> dict[str, bytes]:
    loc = storage.resolve(bucket)
    return {str(p): p.read_bytes() for p in loc.files()}


@pytest.fixture(scope="module")
def on_disk(tmp_path_factory, shard_models, ray_local):
    """The curated shards and caption folder, and the same run on local disk: what the bucket runs must equal."""
    root = tmp_path_factory.mktemp("encode_disk")
    write_curated(root, SHARDS)
    summary = encode.run(
        _cfg(shard_models), str(root / "curated" / "shards"), str(root / "captions"), str(root / "enc"), "256"
    )
    assert summary["encoded_now"] == 24
    return root


def test_bucket_to_bucket_resumes_after_kill_and_equals_disk(
    on_disk, shard_models, ray_local, bucket, s3_counted, tmp_path
):
    upload(on_disk / "curated", f"{bucket}/cur")
    upload(on_disk / "captions", f"{bucket}/caps")
    images, caps, out = f"{bucket}/cur/shards/{{00000..00007}}.tar", f"{bucket}/caps", f"{bucket}/enc"
    fs = storage.resolve(bucket).fs
    env = {**ENV, "RAY_raylet_start_wait_time_s": "180"}  # its own local Ray, on a busy machine
    proc = subprocess.Popen(
        _cli(shard_models, images, caps, out),
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 600  # a busy machine: Ray and the tiny models start slowly
        while time.time() < deadline and proc.poll() is None:
            if fs.glob(f"{out[5:]}/shards/*/*-?????.parquet"):  # a tar committed (its row file written)
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started (its own session)
        proc.wait()
    log = proc.stdout.read()
    committed = encoded.committed_shards(storage.resolve(out))
    assert committed and not storage.resolve(out + "/" + encoded.INDEX).exists(), log.decode()[-3000:]
    before = {str(t): t.info()["etag"] for t in committed}

    s3_counted.fail("GET", 2, "slowdown", path="/cur/shards/")  # throttled reads of the tars, in Ray tasks
    summary = encode.run(_cfg(shard_models), images, caps, out, "256")  # the rerun, from the bucket
    assert summary["storage_retries"] == {"throttled": 2, "server_errors": 0, "dropped": 0}  # retried, counted
    assert summary["encoded_now"] == 24 - sum(len(pq.read_table(encoded.rows_file(t).open("rb"))) for t in committed), (
        summary
    )
    after = {str(t): t.info()["etag"] for t in encoded.committed_shards(storage.resolve(out))}
    assert all(after[t] == tag for t, tag in before.items())  # finished tars untouched
    assert_same(contents(on_disk / "enc"), contents(out))

    written = everything_written(bucket)
    assert not [n for n in written if Path(n).name.startswith(".")]  # no temp object
    assert not [n for n, data in written.items() if S3_SECRET.encode() in data]
    assert S3_SECRET.encode() not in log
    assert not list(tmp_path.glob("s3*")) and not (ROOT / "s3:").exists()


@pytest.mark.slow
def test_two_node_cluster_writes_only_to_the_bucket(on_disk, shard_models, bucket, monkeypatch):
    """A caption TABLE in the bucket, a two-node cluster: the same samples as on disk; outside the bucket only
    Ray's temp folder (and the model cache) is written to, by the driver and by every worker."""
    from ray.cluster_utils import Cluster

    upload(on_disk / "curated", f"{bucket}/cur")
    table = pa.concat_tables([pq.read_table(p) for p in sorted((on_disk / "captions").glob("*.parquet"))])
    with tempfile.NamedTemporaryFile(suffix=".parquet") as f:
        pq.write_table(table, f.name)
        storage.resolve(f"{bucket}/table/captions.parquet").upload(f.name)

    # Every process of the run (driver, raylets, workers) gets an empty HOME, TMPDIR and working folder;
    # short paths: Ray's socket names must stay under 107 characters.
    scratch = Path(tempfile.mkdtemp(prefix="s3e-", dir="/tmp"))
    home, tmp, cwd = scratch / "home", scratch / "tmp", scratch / "cwd"
    for d in (home, tmp, cwd):
        d.mkdir()
    # The session's local Ray (ray_local) turned on Ray's token authentication (RAY_AUTH_MODE=token, inherited)
    # with its token in the real ~/.ray: a cluster started with an empty HOME found none, its processes could
    # not authenticate, and the node start timed out. Read in place, not copied into the empty HOME.
    token = Path.home() / ".ray" / "auth_token"
    if token.is_file():
        monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    cluster = Cluster(
        initialize_head=True, connect=False, head_node_args={"num_cpus": 2, "object_store_memory": 200 * 2**20}
    )
    try:
        cluster.add_node(num_cpus=2, object_store_memory=200 * 2**20)
        cluster.wait_for_nodes()
        env = {**os.environ, "RAY_ADDRESS": cluster.address}  # the empty HOME and TMPDIR, the token's path
        argv = _cli(shard_models, f"{bucket}/cur/shards", f"{bucket}/table/captions.parquet", f"{bucket}/enc")
        r = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, timeout=900, check=False)
        assert r.returncode == 0, r.stderr.decode()[-3000:]
    finally:
        cluster.shutdown()
    assert_same(contents(on_disk / "enc"), contents(f"{bucket}/enc"))

    written = [p for p in scratch.rglob("*") if p.is_file() or p.is_symlink()]
    outside = [p for p in written if not p.is_relative_to(tmp / "ray") and not p.is_relative_to(home / ".cache")]
    assert outside == [], outside[:20]
    leaked = [str(p) for p in written if p.is_file() and S3_SECRET.encode() in p.read_bytes()]
    leaked += [n for n, data in everything_written(bucket).items() if S3_SECRET.encode() in data]
    assert leaked == [] and S3_SECRET.encode() not in r.stdout + r.stderr
    assert not (ROOT / "s3:").exists()


def _main(capsys, models, *argv: str) -> tuple[int, str, str]:
    """encode's entry point in this process: (exit code, stdout, stderr)."""
    sets = [f"models.t5={models['t5']}", f"models.vae={models['vae']}", *SETS]
    try:
        encode.main(["--tier", "256", "--profile", "demo", *argv, *[a for s in sets for a in ("--set", s)]])
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    said = capsys.readouterr()
    return code, said.out, said.err.strip()


def test_store_faults_are_one_line_and_a_dry_run_writes_nothing(on_disk, shard_models, bucket, s3_counted, capsys):
    """Up front (a dry run too): a missing bucket, an unreachable endpoint, one line naming the URL and the
    cause. A dry run into a bucket only reads. The store gone once the run started (every write dropped):
    one line after botocore's retries, no traceback."""
    from tests.curation.test_buckets_in import _closed_port

    upload(on_disk / "curated", f"{bucket}/cur")
    upload(on_disk / "captions", f"{bucket}/caps")
    images, caps, out = f"{bucket}/cur/shards", f"{bucket}/caps", f"{bucket}/enc"
    dead = ["--set", f"storage.s3.endpoint_url=http://127.0.0.1:{_closed_port()}"]
    nowhere = "s3://no-such-bucket-sf"
    cases = [  # (argv, the URL the line names, its cause)
        (["--images", f"{nowhere}/cur", "--captions", caps, "--out", out], f"{nowhere}/cur", "bucket does not"),
        (["--images", images, "--captions", f"{nowhere}/caps", "--out", out], f"{nowhere}/caps", "bucket does not"),
        (["--images", images, "--captions", caps, "--out", f"{nowhere}/enc"], f"{nowhere}/enc", "bucket does not"),
        (["--images", images, "--captions", caps, "--out", out, *dead], images, "does not answer"),
    ]
    for argv, named, cause in cases:
        for dry in ([], ["--dry-run"]):
            code, said, err = _main(capsys, shard_models, *argv, *dry)
            assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), (argv, dry, err)
            assert named in err and cause in err and S3_SECRET not in err + said, err
    before = storage.resolve(bucket).files()
    s3_counted.requests.clear()
    code, said, err = _main(capsys, shard_models, "--images", images, "--captions", caps, "--out", out, "--dry-run")
    assert code == 0 and json.loads(said)["shards"] == len(SHARDS), err
    assert s3_counted.requests and not s3_counted.writes() and storage.resolve(bucket).files() == before

    s3_counted.fail("PUT", 1000, "drop", path="/enc/")
    argv = ["--images", images, "--captions", caps, "--out", out, "--set", "storage.s3.retries=2"]
    code, said, err = _main(capsys, shard_models, *argv)
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert err.splitlines()[-1].startswith(f"error: {out}/") and "does not answer" in err, err
