"""The `vllm` backend for real, without a GPU: vLLM's CPU build in its own venv, the tiny Qwen2-VL.

The slow test builds (once, cached in the user cache like the NSFW converter's TF venv) vLLM's venv
with `captioning/vllm-env --kind cpu`, builds the tiny random Qwen2-VL offline, and runs
`captioning/recaption --captioner vllm-cpu` end to end: killed after its first caption file, resumed
in-process, then compared with the `hf` backend on the same model and shards. The engine starts
twice (once per run: 60-90 s each on 2 cores).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from captioning import recaption, vllm_env
from shards import format as fmt
from shards import reasons
from shards.errors import SigmaError
from tests import venvs

ROOT = Path(__file__).resolve().parents[2]
ENV = {
    **os.environ,
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "PYTHONPATH": str(ROOT),
}
N_SHARDS, PER_SHARD = 8, 4
CORRUPT = "000020001"


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    """vLLM's CPU venv (built once, ~3.5 GB / ~3 min, from the session's start: tests/venvs.py); a failed
    install fails the test."""
    try:
        venvs.wait("vllm")
        return vllm_env.build("cpu")
    except SigmaError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="module")
def qwen2vl(tmp_path_factory) -> Path:
    from demo import tiny_qwen2vl

    return tiny_qwen2vl.build(tmp_path_factory.mktemp("qwen2vl") / "qwen2vl")


def _overrides(qwen2vl, cap_models, name):
    return [
        f"captioning.captioners.{name}.model={qwen2vl}",
        f"models.t5={cap_models['t5']}",
        f"captioning.captioners.{name}.max_new_tokens=16",
        f"captioning.captioners.{name}.resources.batch_size=4",
    ]


def _rows(capdir):
    return {p.name: pq.read_table(p).to_pylist() for p in sorted(capdir.glob("*.parquet"))}


@pytest.mark.slow
def test_vllm_recaption_end_to_end_resume_and_same_files_as_hf(
    vllm_python, qwen2vl, cap_models, make_cfg, make_shards, ray_local, tmp_path
):
    make_shards(tmp_path / "cur", N_SHARDS, PER_SHARD, corrupt={CORRUPT})
    shards = str(tmp_path / "cur" / "shards")
    capdir = tmp_path / "vllm"
    sets = [a for o in _overrides(qwen2vl, cap_models, "vllm-cpu") for a in ("--set", o)]
    cmd = [
        sys.executable,
        str(ROOT / "captioning" / "recaption"),
        "--profile",
        "demo",
        "--captioner",
        "vllm-cpu",
        "--shards",
        shards,
        "--out",
        str(capdir),
        *sets,
    ]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 420  # the engine's start dominates
        while time.time() < deadline and not list(capdir.glob("*.parquet")) and proc.poll() is None:
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, its local Ray and the engine (one session)
        proc.wait()
    first = {p.name: p.stat().st_mtime_ns for p in capdir.glob("*.parquet")}
    assert 1 <= len(first) < N_SHARDS, proc.stdout.read().decode()[-3000:]

    summary = recaption.run(make_cfg(*_overrides(qwen2vl, cap_models, "vllm-cpu")), shards, str(capdir), "vllm-cpu")
    assert summary["skipped"] == len(first) and summary["written"] == N_SHARDS - len(first)
    assert {name: (capdir / name).stat().st_mtime_ns for name in first} == first  # finished shards untouched
    assert not list(capdir.glob(".*.tmp")) and (capdir / "report.html").is_file()
    vllm_rows = _rows(capdir)
    flat = [r for rows in vllm_rows.values() for r in rows]
    assert len(flat) == N_SHARDS * PER_SHARD
    assert {r["captioner"] for r in flat} == {f"{qwen2vl}@local"}
    bad = [r for r in flat if r["key"] == CORRUPT]
    assert [(r["status"], r["reason"], r["caption"]) for r in bad] == [(reasons.FAILED, reasons.NOT_AN_IMAGE, "")]
    kept = [r for r in flat if r["status"] == reasons.KEPT]
    assert len(kept) >= N_SHARDS * PER_SHARD - 4 and all(r["caption"] and r["num_tokens"] > 0 for r in kept)

    hf_dir = tmp_path / "hf"
    recaption.run(make_cfg(*_overrides(qwen2vl, cap_models, "hf")), shards, str(hf_dir), "hf")
    hf_rows = _rows(hf_dir)
    assert list(hf_rows) == list(vllm_rows)  # the same caption files
    for name in hf_rows:
        same = ("key", "status", "reason", "prompt", "original_caption", "captioner")
        assert [{k: r[k] for k in same} for r in hf_rows[name]] == [{k: r[k] for k in same} for r in vllm_rows[name]]
        assert pq.read_schema(hf_dir / name).names == pq.read_schema(capdir / name).names == fmt.CAPTION_COLUMNS


def test_a_missing_vllm_env_is_one_line(tmp_path):
    with pytest.raises(SigmaError) as e:
        vllm_env.check(tmp_path / "no-venv")
    assert "captioning/vllm-env --kind cpu|cuda" in str(e.value) and "\n" not in str(e.value)


def test_shipped_vllm_configs_pin_revisions_and_refuse_without_one(make_cfg):
    cfg = make_cfg()
    for name in ("qwen25vl-7b-vllm", "internvl3-8b-vllm"):
        cap = cfg.captioning.captioners[name]
        assert cap.backend == "vllm" and cap.require_revision and len(cap.revision) == 40
        assert {"max_model_len", "gpu_memory_utilization", "tensor_parallel_size", "limit_mm_per_prompt"} <= set(
            cap.engine_kwargs
        )
    unpinned = make_cfg("captioning.captioners.qwen25vl-7b-vllm.revision=null")
    with pytest.raises(SigmaError, match=r"qwen25vl-7b-vllm\.revision: not pinned") as e:
        recaption.select(unpinned, "qwen25vl-7b-vllm")
    assert "--set captioning.captioners.qwen25vl-7b-vllm.revision=<40-hex commit>" in str(e.value)
    with pytest.raises(SigmaError, match="only the vllm backend takes engine arguments"):
        recaption.select(make_cfg("captioning.captioners.hf.engine_kwargs={max_model_len: 64}"), "hf")


def test_vllm_runtime_env_adds_the_venv_python(make_cfg, monkeypatch, tmp_path):
    monkeypatch.setattr(vllm_env, "check", lambda venv=None: tmp_path / "bin" / "python")
    cap = make_cfg().captioning.captioners["vllm-cpu"]
    env = recaption.runtime_env(cap)
    assert env["py_executable"] == str(tmp_path / "bin" / "python") and env["env_vars"]["VLLM_CPU_KVCACHE_SPACE"] == "1"
    cap.runtime_env = {"py_executable": "/shared/vllm-venv/bin/python"}  # a cluster's shared venv wins
    assert recaption.runtime_env(cap) == {"py_executable": "/shared/vllm-venv/bin/python"}
