"""`ray job submit --working-dir .` against a real head node started here (its own ports and temp dir).

A head node plus a job take ~1-2 min on 2 cores: the way the README runs curation on a cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.terminal import noise

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head(tmp_path):
    """A head node in its own process group; token auth off on both sides (Ray 2.60 may turn it on)."""
    port, dash = _free_port(), _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    temp = Path("/tmp") / f"rayjob-{os.getpid()}-{port}"  # short: Ray's socket paths must stay < 108 chars
    proc = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(port),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dash),
            "--dashboard-agent-listen-port",
            str(_free_port()),  # 52365 may be another cluster's
            "--metrics-export-port",
            str(_free_port()),
            "--num-cpus",
            "2",
            "--temp-dir",
            str(temp),
            "--include-dashboard",
            "true",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        r = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env, capture_output=True)
        if r.returncode == 0:
            break
        time.sleep(2)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
        pytest.skip("ray head did not come up within 120 s on this machine")
    yield address, env
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    shutil.rmtree(temp, ignore_errors=True)


def _submit(address: str, env: dict, *command: str) -> subprocess.CompletedProcess:
    argv = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".", "--", "python", *command]
    for _ in range(15):  # the dashboard answers before its job agent registers
        r = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        if "No available agent" not in r.stderr:
            return r
        time.sleep(2)
    return r


@pytest.mark.slow
def test_ray_job_submit(head, server, tiny_models, tmp_path):
    address, env = head
    urls = [f"{server.url}/square-1k.jpg", f"{server.url}/small.jpg", server.fault_urls()["http_404"]]
    pq.write_table(pa.table({"url": urls}), tmp_path / "urls.parquet")
    # exactly the README's command: .cache/tiny is git-ignored, so not uploaded; the demo profile finds
    # the tiny models in the user cache that demo/tiny_models.py mirrors them to
    r = _submit(
        address,
        env,
        "curation/run.py",
        "--urls",
        str(tmp_path / "urls.parquet"),
        "--out",
        str(tmp_path / "out"),
        "--profile",
        "demo",
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    logs = r.stdout + r.stderr  # the job's own output, as `ray job logs` shows it: no TTY, so no bars
    assert "download shard 00000: 3 URLs scored (1/1 shards)" in logs and "download+score:" not in logs, logs[-3000:]
    assert not noise(logs), noise(logs)  # e.g. the measure_rows memory advice, the Embed actor's core_worker line
    m = pd.read_parquet(tmp_path / "out" / "manifest.parquet").set_index("url")
    assert m.loc[urls, "reason"].tolist() == [None, "too_small", "http_404"]
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["kept"] == 1
    # the next stages the same way, on the same cluster
    r = _submit(
        address,
        env,
        "captioning/recaption",
        "--shards",
        str(tmp_path / "out" / "shards"),
        "--out",
        str(tmp_path / "caps"),
        "--profile",
        "demo",
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert not noise(r.stdout + r.stderr), noise(r.stdout + r.stderr)
    assert pq.read_table(tmp_path / "caps" / "00000.parquet").num_rows == 1
    r = _submit(
        address,
        env,
        "encoding/encode",
        "--images",
        str(tmp_path / "out" / "shards" / "*.tar"),
        "--captions",
        str(tmp_path / "caps"),
        "--out",
        str(tmp_path / "enc"),
        "--tier",
        "256",
        "--profile",
        "demo",
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert not noise(r.stdout + r.stderr), noise(r.stdout + r.stderr)  # incl. the VAE actors' accelerate hint
    index = pd.read_parquet(tmp_path / "enc" / "index.parquet")
    assert index["status"].tolist() == ["kept"], r.stdout[-2000:]
