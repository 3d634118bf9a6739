"""Curation's outputs in a bucket (moto's S3 server on loopback, real Ray): the same manifest and curated
shards as a run into a local folder, a driver killed with SIGKILL resumed from the bucket, a two-node run
that writes nothing outside the bucket, Ray's temp folders and the model cache, and the test's secret key
in nothing written."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
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

from shards import storage
from tests.conftest import S3_SECRET
from tests.curation.test_pipeline import ORDER

ROOT = Path(__file__).resolve().parents[2]
RUN = [sys.executable, str(ROOT / "curation" / "run.py")]
SETS = ["curation.download.shard_size=5", "curation.download.timeout=2", "curation.shard_size=2"]  # = demo_cfg()


def _argv(urls: Path, out: str, *sets: str) -> list[str]:
    sets = [a for s in (*SETS, *sets) for a in ("--set", s)]
    return RUN + ["--urls", str(urls), "--out", out, "--profile", "demo", *sets]


def _plain(url: str) -> str:
    """A served file's URL without the server's address and its /hold/ and /delay/MS/ routes."""
    return re.sub(r"^http://[^/]+(/hold|/delay/\d+)*", "", url) if isinstance(url, str) else url


def _manifest(out: storage.Loc) -> pd.DataFrame:
    m = storage.read_parquet(out / "manifest.parquet").to_pandas()
    m["url"] = m["url"].map(_plain)
    return m


def _same_manifest(a: pd.DataFrame, b: pd.DataFrame) -> None:
    """Equal rows; `aesthetic` to 1e-6 (float32 CLIP on batches whose make-up varies: 1e-8 apart)."""
    pd.testing.assert_frame_equal(a, b, check_dtype=False, check_exact=False, rtol=0, atol=1e-6)


def _members(out: storage.Loc) -> tuple[dict[str, dict], dict[str, float]]:
    """({tar: {member: bytes}}, {member: aesthetic}) of the curated shards, .json members parsed (url
    plain, aesthetic apart: compared to 1e-6)."""
    found, aesthetic = {}, {}
    for tar in (out / "shards").glob("*.tar"):
        with tarfile.open(fileobj=io.BytesIO(tar.read_bytes())) as t:
            members = {}
            for n in t.getnames():
                data = t.extractfile(n).read()
                if n.endswith(".json"):
                    data = json.loads(data)
                    aesthetic[n], data["url"] = data.pop("aesthetic"), _plain(data["url"])
                members[n] = data
            found[tar.name] = members
    return found, aesthetic


def _same_members(a: storage.Loc, b: storage.Loc) -> None:
    (members_a, aesthetic_a), (members_b, aesthetic_b) = _members(a), _members(b)
    assert members_a == members_b
    assert aesthetic_a == pytest.approx(aesthetic_b, rel=0, abs=1e-6)


def _assert_clean_bucket(out: storage.Loc, text: str) -> None:
    """Committed, nothing half-made, no download tar left, and the secret in no object and no output."""
    objects = out.files()
    names = [o.relative_to(out) for o in objects]
    assert "manifest.parquet" in names and "stats.json" in names and "report.html" in names
    assert "_work/dedup/hashes/_COMMITTED" in names  # the dedup steps' folders are committed by marker
    assert not [n for n in names if n.endswith(".tmp") or re.fullmatch(r"downloads/\d{5}\.tar", n)], names
    for o in objects:
        assert S3_SECRET.encode() not in o.read_bytes(), o
    assert S3_SECRET not in text


@pytest.mark.slow
def test_two_nodes_into_a_bucket_match_local_and_write_nowhere_else(curated, bucket, request, monkeypatch):
    """(1) the demo list curated into s3:// gives the manifest rows and shard members of the same run on
    disk; (3) on two nodes, writing nothing outside the bucket, Ray's temp folders and the model cache;
    (4) the secret key in no object, output or Ray log."""
    from ray.cluster_utils import Cluster

    ref_out, _, _, _ = curated
    places = {name: Path(tempfile.mkdtemp(prefix=f"sf-{name}-", dir="/tmp")) for name in ("cwd", "home", "tmp", "w")}
    request.addfinalizer(lambda: [shutil.rmtree(p, ignore_errors=True) for p in places.values()])
    before = {p.name for p in ROOT.iterdir()}
    monkeypatch.setenv("TMPDIR", str(places["w"]))  # the nodes' raylets and workers inherit it (short: Ray's sockets)
    cluster = Cluster(
        initialize_head=True, connect=False, head_node_args={"num_cpus": 2, "object_store_memory": 200 * 2**20}
    )
    try:
        cluster.add_node(num_cpus=2, object_store_memory=200 * 2**20)
        cluster.wait_for_nodes()
        logs = Path(cluster.head_node.get_session_dir_path()) / "logs"
        env = {
            **os.environ,
            "RAY_ADDRESS": cluster.address,
            "HOME": str(places["home"]),
            "TMPDIR": str(places["tmp"]),
            "PYTHONPATH": str(ROOT),
        }
        token = Path.home() / ".ray" / "auth_token"  # read, not written: the cluster's token under the real HOME
        if token.is_file():
            env["RAY_AUTH_TOKEN_PATH"] = str(token)
        argv = _argv(ref_out.parent / "urls.parquet", f"{bucket}/cur", "curation.dedup.partition_rows=5")
        r = subprocess.run(argv, cwd=places["cwd"], env=env, capture_output=True, text=True, timeout=600, check=False)
        assert r.returncode == 0, r.stderr[-3000:]
    finally:
        cluster.shutdown()
    out = storage.resolve(f"{bucket}/cur")
    stats = json.loads((out / "stats.json").read_text())
    assert all(stats["nodes"].get(step, 0) >= 2 for step in ("download", "measure", "write")), stats["nodes"]
    local = storage.resolve(ref_out)
    _same_manifest(_manifest(local), _manifest(out))
    _same_members(local, out)

    ray_logs = "".join(p.read_text(errors="replace") for p in logs.rglob("*") if p.is_file())
    _assert_clean_bucket(out, r.stdout + r.stderr + ray_logs)
    # files only: importing img2dataset imports wandb, which makes empty temp folders, and multiprocessing
    # leaves its listener socket in a pymp- folder; matplotlib caches its font list in HOME (the report's plots)
    left = {name: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()) for name, d in places.items()}
    left["w"] = [p for p in left["w"] if not p.startswith("ray/")]  # Ray's temp folders
    left["home"] = [p for p in left["home"] if not p.startswith(".cache/matplotlib/")]
    assert left == {name: [] for name in places}, left
    assert {p.name for p in ROOT.iterdir()} == before  # no ./s3: folder, nothing beside the checkout


def test_kill_9_resumes_from_the_bucket(ray_local, tiny_models, image_dir, curated, bucket, s3_counted, tmp_path):
    """(2) SIGKILL the driver once a shard is scored (the last download shard held); the rerun reads the
    bucket, redoes nothing finished and ends with the manifest rows and members of the run on disk."""
    from demo.serve import ImageServer

    ref_out, _, _, _ = curated
    with ImageServer(image_dir, slow_s=4) as srv:
        routes = ["delay/300"] * 10 + ["hold"] * 2  # download shards of 5: the third waits for release()
        urls = [f"{srv.url}/{r}/{n}" for r, n in zip(routes, ORDER)]
        table = {"url": urls, "caption": [f"alt text {n}" for n in ORDER], "name": ORDER, "status": ["carried"] * 12}
        pq.write_table(pa.table(table), tmp_path / "urls.parquet")
        holds = ["curation.download.timeout=600", "curation.download.max_seconds=600"]  # the held URLs wait
        # batches of 1: Ray Data holds a partial batch until upstream ends, and no shard would be scored
        argv = _argv(tmp_path / "urls.parquet", f"{bucket}/cur", *holds, "curation.aesthetic_resources.batch_size=1")
        env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
        )
        out = storage.resolve(f"{bucket}/cur")
        scored = out / "_work" / "scored"
        deadline = time.time() + 300
        while not scored.iterdir() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGKILL)
        said = b"".join(proc.communicate()).decode(errors="replace")
        done = {p.name: p.info()["etag"] for p in scored.iterdir()}
        assert done and len(done) < 3, f"kill came too late to test resumption: {done}\n{said[-2000:]}"
        assert not (out / "manifest.parquet").has_file()
        srv.release()
        s3_counted.fail("PUT", 3, "slowdown", path="/cur/shards/")  # throttled writes of curated shards (Ray tasks)
        r = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "stats.json").read_text())["storage_retries"]["throttled"] == 3  # retried, counted
    assert {p.name: p.info()["etag"] for p in scored.iterdir() if p.name in done} == done  # not redone
    ref = _manifest(storage.resolve(ref_out))
    ref = ref[ref["key"] < f"{len(ORDER):010d}"].reset_index(drop=True)  # without the faults: no null widths,
    _same_manifest(ref, _manifest(out))  # so int64 here and float64 there
    _same_members(storage.resolve(ref_out), out)  # the faults the reference adds are never kept
    _assert_clean_bucket(out, said + r.stdout + r.stderr)
