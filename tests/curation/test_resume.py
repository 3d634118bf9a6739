"""The entry point: bad inputs fail at once in one line; a driver killed with SIGKILL resumes cleanly."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.terminal import RATE_AND_ETA, terminal

ROOT = Path(__file__).resolve().parents[2]
RUN = [sys.executable, str(ROOT / "curation" / "run.py")]


def _run_main(capsys, *argv):
    from curation import run

    with pytest.raises(SystemExit) as e:
        run.main(list(argv))
    return e.value.code, capsys.readouterr().err.strip()


def test_bad_inputs_fail_at_once_in_one_line(tmp_path, capsys, tiny_models):
    pq.write_table(pa.table({"href": ["http://a/x.jpg"]}), tmp_path / "nourl.parquet")
    pq.write_table(pa.table({"url": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    (tmp_path / "list.xml").write_text("<urls/>\n")
    cases = {
        "nourl.parquet": "no URL column",
        "empty.parquet": "empty",
        "broken.parquet": "cannot read",
        "list.xml": "unsupported format",
        "missing.parquet": "not found",
    }
    for name, msg in cases.items():
        code, err = _run_main(capsys, "--urls", str(tmp_path / name), "--out", str(tmp_path / "o"), "--profile", "demo")
        assert code == 2 and len(err.splitlines()) == 1 and name in err and msg in err, err
    code, err = _run_main(
        capsys,
        "--urls",
        "u.parquet",
        "--out",
        "o",
        "--profile",
        "demo",
        "--set",
        "models.aesthetic_head=/nowhere/head.pth",
    )
    assert code == 2 and "models.aesthetic_head" in err
    code, err = _run_main(
        capsys, "--urls", "u.parquet", "--out", "o", "--profile", "demo", "--set", "curation.nsfw.enabled=true"
    )
    assert code == 2 and "models.nsfw_head" in err and "not set" in err  # enabled filter without weights
    (tmp_path / "clip_autokeras_binary_nsfw").mkdir()  # the autokeras folder the worker cannot load
    code, err = _run_main(
        capsys,
        "--urls",
        "u.parquet",
        "--out",
        "o",
        "--profile",
        "demo",
        "--set",
        "curation.nsfw.enabled=true",
        "--set",
        f"models.nsfw_head={tmp_path / 'clip_autokeras_binary_nsfw'}",
    )
    assert code == 2 and "models.nsfw_head" in err and "not a PyTorch weights file" in err, err
    from curation import run as cli  # --dry-run runs before the list exists, and says it could not check it

    cli.main(["--urls", str(tmp_path / "missing.parquet"), "--out", "o", "--profile", "demo", "--dry-run"])
    out, err = capsys.readouterr()
    assert "dry run: not checked: " in err and "missing.parquet: URL list not found" in err, err
    assert json.loads(out)["not_checked"] == [f"{tmp_path / 'missing.parquet'}: URL list not found"]
    code, err = _run_main(
        capsys, "--urls", str(tmp_path / "nourl.parquet"), "--out", "o", "--profile", "demo", "--dry-run"
    )
    assert code == 2 and "no URL column" in err, err


def test_csv_and_jsonl_inputs(tmp_path):
    from curation import inputs

    pd.DataFrame({"url": ["http://a/1.jpg", "ftp://b"], "caption": ["x", "y"]}).to_csv(tmp_path / "u.csv", index=False)
    pd.DataFrame({"url": ["http://a/1.jpg", "http://a/2.jpg", "http://a/3.jpg"]}).to_json(
        tmp_path / "u.jsonl", orient="records", lines=True
    )
    assert inputs.split_input(tmp_path / "u.csv", tmp_path / "c", 10) == 1
    assert inputs.split_input(tmp_path / "u.jsonl", tmp_path / "j", 2) == 2
    keys = [pq.read_table(p)["key"].to_pylist() for p in sorted((tmp_path / "j").glob("*.parquet"))]
    assert keys == [["0000000000", "0000000001"], ["0000000002"]]
    assert pq.read_table(tmp_path / "c" / "00000.parquet").column_names == ["key", "url", "caption"]


def test_resume_after_kill(ray_local, tiny_models, server, tmp_path):
    """SIGKILL the driver once a shard is finished; the rerun redoes nothing finished and loses nothing."""
    names = ["square-1k.jpg", "wide-1k.webp", "portrait-1k.png", "small.jpg", "flat.png", "rotated.jpg"] * 2
    routes = ["delay/200"] * 10 + ["hold"] * 2  # the last download shard hangs until released, after the kill
    urls = [f"{server.url}/{r}/{n}?resume={i}" for i, (r, n) in enumerate(zip(routes, names))]
    pq.write_table(pa.table({"url": urls}), tmp_path / "urls.parquet")
    out = tmp_path / "out"
    argv = RUN + [
        "--urls",
        str(tmp_path / "urls.parquet"),
        "--out",
        str(out),
        "--profile",
        "demo",
        "--set",
        "curation.download.shard_size=2",
        "--set",
        "curation.shard_size=2",
        "--set",
        "curation.download.threads=1",
        "--set",
        "curation.download.timeout=120",
        "--set",
        "curation.aesthetic_resources.batch_size=1",
    ]  # Ray Data holds partial batches until upstream ends
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    proc = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    scored = out / "_work" / "scored"
    deadline = time.time() + 150
    while not list(scored.glob("*.parquet")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = {p: p.stat().st_mtime_ns for p in scored.glob("*.parquet")}
    assert done and len(done) < 6, "kill came too late to test resumption"
    assert not (out / "manifest.parquet").exists()
    requests_before = Counter(server.requests)
    server.release()

    with terminal() as tty:  # the rerun as in a user's shell: progress bars with rate and ETA on stderr
        r = subprocess.run(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=tty.slave, text=True, timeout=300)
    assert r.returncode == 0, tty.text[-2000:]
    assert "download+score:" in tty.text and re.search(RATE_AND_ETA.format(unit="url"), tty.text), tty.text[-2000:]
    assert "write: 100%" in tty.text and re.search(RATE_AND_ETA.format(unit="shard"), tty.text), tty.text[-2000:]
    assert {p: p.stat().st_mtime_ns for p in done} == done  # finished shards not redone
    finished_keys = {k for p in done for k in pq.read_table(p, columns=["key"])["key"].to_pylist()}
    m = pd.read_parquet(out / "manifest.parquet")
    assert sorted(m["url"]) == sorted(urls) and m["key"].is_unique
    for url in m.loc[m.key.isin(finished_keys), "url"]:  # downloaded once, before the kill
        path = url.split(str(server.url), 1)[1]
        assert Counter(server.requests)[path] == requests_before[path] == 1
    kept = []
    for tar in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(tar) as t:
            kept += [n.split(".")[0] for n in t.getnames() if not n.endswith((".json", ".txt"))]
    assert sorted(kept) == sorted(m.loc[m.status == "kept", "key"])  # nothing lost, nothing twice
    assert not list(out.rglob("*.tmp"))
