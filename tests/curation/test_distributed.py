"""The stage on a real two-node Ray cluster (same outputs as one node), and incremental runs
(`--dedup-against` an earlier run's kept images)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shards.errors import SigmaError
from tests.curation.test_pipeline import demo_cfg

ROOT = Path(__file__).resolve().parents[2]
RUN = [sys.executable, str(ROOT / "curation" / "run.py")]
SETS = ["curation.download.shard_size=5", "curation.download.timeout=2", "curation.shard_size=2"]  # = demo_cfg()


def _tar_members(out: Path) -> dict[str, dict]:
    """{tar: {member: bytes}}, the .json members parsed, aesthetic rounded (float32 batching varies at 1e-8)."""
    found = {}
    for tar in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(tar) as t:
            members = {}
            for n in t.getnames():
                data = t.extractfile(n).read()
                if n.endswith(".json"):
                    data = json.loads(data)
                    data["aesthetic"] = round(data["aesthetic"], 6)
                members[n] = data
            found[tar.name] = members
    return found


@pytest.mark.slow
def test_two_node_cluster_spreads_every_step_and_matches_one_node(curated, tmp_path):
    from ray.cluster_utils import Cluster

    ref_out, _, _, _ = curated
    cluster = Cluster(
        initialize_head=True, connect=False, head_node_args={"num_cpus": 2, "object_store_memory": 200 * 2**20}
    )
    try:
        cluster.add_node(num_cpus=2, object_store_memory=200 * 2**20)
        cluster.wait_for_nodes()
        argv = RUN + [
            "--urls",
            str(ref_out.parent / "urls.parquet"),
            "--out",
            str(tmp_path / "out"),
            "--profile",
            "demo",
            *[a for s in SETS for a in ("--set", s)],
            *("--set", "curation.dedup.partition_rows=5"),  # several dedup tasks to spread (same output)
        ]
        env = {**os.environ, "RAY_ADDRESS": cluster.address}
        r = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
        assert r.returncode == 0, r.stderr[-3000:]
    finally:
        cluster.shutdown()
    out = tmp_path / "out"
    stats = json.loads((out / "stats.json").read_text())
    assert all(stats["nodes"].get(step, 0) >= 2 for step in ("download", "measure", "dedup", "write")), stats["nodes"]
    a, b = pd.read_parquet(ref_out / "manifest.parquet"), pd.read_parquet(out / "manifest.parquet")
    a["aesthetic"], b["aesthetic"] = a["aesthetic"].round(6), b["aesthetic"].round(6)
    pd.testing.assert_frame_equal(a, b)
    assert _tar_members(ref_out) == _tar_members(out)
    assert not list((out / "downloads").glob("*.tar"))


def test_dedup_against_an_earlier_run(curated, ray_local, server, tmp_path, capsys):
    from curation import pipeline, run

    first, m1, _, _ = curated
    names = ["square-1k.jpg", "near-small.jpg", "fresh-1k.jpg", "small.jpg"]
    urls = [f"{server.url}/{n}?run=2" for n in names]
    pq.write_table(pa.table({"url": urls, "name": names}), tmp_path / "urls.parquet")
    pipeline.run(tmp_path / "urls.parquet", tmp_path / "second", demo_cfg(), [first])
    m2 = pd.read_parquet(tmp_path / "second" / "manifest.parquet").set_index("name")
    assert m2.loc["square-1k.jpg", "reason"] == "duplicate"  # exact copy of the earlier run's kept image
    assert m2.loc["square-1k.jpg", "dup_of"] == f"{first.name}/{m1.loc['square-1k.jpg', 'key']}"
    assert m2.loc["near-small.jpg", "dup_of"] == f"{first.name}/{m1.loc['near-big.jpg', 'key']}"
    assert m2.loc["fresh-1k.jpg", "status"] == "kept" and m2.loc["small.jpg", "reason"] == "too_small"
    index = pq.read_table(tmp_path / "second" / "dedup_index").to_pandas()  # what a third run reads back
    assert index["key"].tolist() == [m2.loc["fresh-1k.jpg", "key"]]
    with pytest.raises(SigmaError, match="another --dedup-against"):  # the earlier runs are an input too
        pipeline.run(tmp_path / "urls.parquet", tmp_path / "second", demo_cfg(), [])
    capsys.readouterr()  # what the runs above logged is not the error's line
    with pytest.raises(SystemExit) as e:
        run.main(
            [
                "--urls",
                str(tmp_path / "urls.parquet"),
                "--out",
                str(tmp_path / "third"),
                "--profile",
                "demo",
                "--dedup-against",
                str(tmp_path),
            ]
        )
    # ours is one line; Ray's own processes may still log to the same stderr from the run before
    ours = [line for line in capsys.readouterr().err.splitlines() if "(pid=" not in line]
    assert e.value.code == 2 and len(ours) == 1 and "not a finished curation run" in ours[0]
