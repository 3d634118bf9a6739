"""The `share-captioner` backend inside the runtime_env that pipelines.yaml ships for it.

Ray builds that environment (transformers 4.31.0 and its pinned companions over a clone of this
venv) and the STAND-IN Share-Captioner (remote code, see conftest) captions a curated shard in it
through `recaption.run`. The stand-in's loader reports, from inside the actor, the transformers
it was imported with.
"""

import json
from pathlib import Path

import pytest
import yaml

from shards import reasons

ROOT = Path(__file__).resolve().parents[2]
KEY = "captioning.captioners.share-captioner"


def shipped_runtime_env() -> dict:
    return yaml.safe_load((ROOT / "pipelines.yaml").read_text())["captioning"]["captioners"]["share-captioner"][
        "runtime_env"
    ]


@pytest.fixture
def built_envs(ray_local):
    """Removes the pip environments Ray builds during the test: each is a full clone of this venv
    (~7 GB), kept by Ray for the rest of its session and never reused by a later session."""
    import shutil

    pip_dir = Path(ray_local._private.worker._global_node.get_session_dir_path()) / "runtime_resources" / "pip"
    before = set(pip_dir.glob("*"))
    yield
    for path in set(pip_dir.glob("*")) - before:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
def test_share_captioner_runs_in_its_own_environment(
    built_envs, cap_models, standin_share_captioner, make_shards, tmp_path
):
    import pyarrow.parquet as pq
    import transformers

    from captioning import recaption
    from common import config

    report = tmp_path / "report"
    report.mkdir()
    env = {**shipped_runtime_env(), "env_vars": {"STANDIN_SHARE_CAPTIONER_REPORT": str(report)}}
    assert "transformers==4.31.0" in env["pip"]["packages"]
    cfg = config.load(
        ROOT / "pipelines.yaml",
        "demo",
        [
            "captioning.captioner=share-captioner",
            f"{KEY}.model={standin_share_captioner}",
            f"{KEY}.revision=null",
            f"{KEY}.dtype=float32",
            f"{KEY}.max_new_tokens=4",
            f"{KEY}.runtime_env={json.dumps(env)}",
            f"models.t5={cap_models['t5']}",
            f"{KEY}.resources={{batch_size: 4, num_gpus: 0, num_cpus: 1, concurrency: 1}}",
        ],
    )
    shards = make_shards(tmp_path / "cur", 1, 3, corrupt={"000000001"})

    summary = recaption.run(cfg, str(shards[0]), str(tmp_path / "caps"))

    rows = pq.read_table(tmp_path / "caps" / "00000.parquet").to_pylist()
    assert summary["written"] == 1 and [r["status"] for r in rows] == [reasons.KEPT, reasons.FAILED, reasons.KEPT]
    assert rows[1]["reason"] == reasons.NOT_AN_IMAGE
    seen = [json.loads(p.read_text()) for p in report.glob("*.json")]
    assert seen and {s["transformers"] for s in seen} == {"4.31.0"}, seen
    assert transformers.__version__ != "4.31.0"  # the driver's own environment is untouched
