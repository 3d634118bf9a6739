"""The pass-through captioner: alt text -> caption files with no model, then encode -> finetune on them."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq

from captioning import recaption
from captioning.original import OriginalCaptioner
from encoding import encode
from shards import encoded, reasons
from shards import format as fmt
from tests.shards.synthetic import image_bytes
from training import checkpoint, finetune

ALT = {"000000001": "a red fox in the snow", "000000002": "  a small   wooden house ", "000000003": ""}


def write_shard(path, alt: dict[str, str]) -> None:
    """One curated shard: 300x300 JPEGs (the 256 stage's square bucket), KEY.json, KEY.txt."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, text in alt.items():
            members = {
                "jpg": image_bytes(300, 300, int(key)),
                "json": json.dumps({"width": 300, "height": 300}).encode(),
                "txt": text.encode(),
            }
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_the_batch_callable_passes_alt_text_and_fails_rows_without():
    batch = {
        "key": np.array(["a", "b"], dtype=object),
        "image": np.array([b"x", b"y"], dtype=object),
        "original_caption": np.array([" a fox ", ""], dtype=object),
    }
    out = OriginalCaptioner()(batch)
    assert "image" not in out
    assert list(out["caption"]) == ["a fox", ""]
    assert list(zip(out["status"], out["reason"])) == [(reasons.KEPT, ""), (reasons.FAILED, reasons.NO_ALT_TEXT)]


def test_original_captions_encode_and_train_end_to_end(tiny_models, ray_local, tmp_path, capsys):
    shard = tmp_path / "cur" / "shards" / "00000.tar"
    write_shard(shard, ALT)
    caps, enc, runs = tmp_path / "caps", tmp_path / "enc", tmp_path / "runs"

    recaption.main(["--shards", str(shard.parent), "--out", str(caps), "--captioner", "original", "--profile", "demo"])
    rows = {r["key"]: r for r in pq.read_table(fmt.caption_file(caps, shard)).to_pylist()}
    assert rows["000000001"]["caption"] == "a red fox in the snow" and rows["000000001"]["captioner"] == "original"
    assert rows["000000002"]["caption"] == "a small wooden house"  # whitespace collapsed like every caption
    assert rows["000000001"]["num_tokens"] > 1 and rows["000000001"]["prompt"] == ""
    assert (rows["000000003"]["status"], rows["000000003"]["reason"]) == (reasons.FAILED, reasons.NO_ALT_TEXT)
    assert (caps / "report.html").exists()
    # a rerun skips the finished shard (same per-shard resume as the model backends)
    capsys.readouterr()
    recaption.main(["--shards", str(shard.parent), "--out", str(caps), "--captioner", "original", "--profile", "demo"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["skipped"] == 1

    encode.main(
        [
            "--images",
            str(shard.parent),
            "--captions",
            str(caps),
            "--out",
            str(enc),
            "--tier",
            "256",
            "--profile",
            "demo",
        ]
    )
    idx = pq.read_table(enc / encoded.INDEX).to_pandas().set_index("key")
    assert dict(zip(idx.index, zip(idx["status"], idx["reason"]))) == {
        "000000001": (reasons.KEPT, ""),
        "000000002": (reasons.KEPT, ""),
        "000000003": (reasons.FAILED, reasons.NO_ALT_TEXT),
    }
    captions: dict[str, dict[str, str]] = {}  # the alt text is the encoded sample's caption (and its original)
    for tar in encoded.committed_shards(enc):
        for name, file in encoded.set_files(tar).items():
            for row in encoded.read_set(file, ["key", "caption"]):
                captions.setdefault(row["key"], {})[name] = row["caption"]
    assert captions["000000001"] == {"recaption": "a red fox in the snow", "original": "a red fox in the snow"}

    finetune.main(
        [
            "--stage",
            "256",
            "--data",
            str(enc),
            "--profile",
            "demo",
            "--max-steps",
            "2",
            "--set",
            f"training.out={runs}",
            "--set",
            "training.sample_every=0",
            "--set",
            "training.checkpoint_every=2",
            "--set",
            "training.stages.256.batch_size=1",
        ]
    )
    assert checkpoint.list_steps(runs / "256") == [2]


def test_original_needs_no_model_and_an_unreachable_hub_is_one_line(tmp_path):
    """No --profile, the hub unreachable (a closed loopback port, HF_HUB_OFFLINE unset) and an empty HF
    cache: the pass-through captions with token counts skipped, said in one line; a model backend is
    refused in one line naming the model and the key, before Ray starts."""
    import os
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    shard = tmp_path / "cur" / "shards" / "00000.tar"
    write_shard(shard, ALT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(root))

    def recaption(*args):
        argv = [sys.executable, str(root / "captioning/recaption"), "--shards", str(shard.parent), *args]
        return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)

    start = time.monotonic()
    r = recaption("--out", str(tmp_path / "hf-caps"), "--captioner", "hf")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("error: captioning.captioners.hf.model: captioner Qwen/Qwen2.5-VL-7B-Instruct")
    assert "unreachable" in r.stderr and "--profile demo" in r.stderr
    assert time.monotonic() - start < 60  # imports included; the hub client alone retried for ~60 s before

    r = recaption("--out", str(tmp_path / "caps"), "--captioner", "original", "--set", "ray.num_cpus=2")
    assert r.returncode == 0, r.stderr[-3000:]
    skipped = [line for line in r.stderr.splitlines() if "token counts skipped" in line]
    assert len(skipped) == 1 and "models.t5 google/t5-v1_1-xxl" in skipped[0], r.stderr
    assert "Traceback" not in r.stderr
    rows = {row["key"]: row for row in pq.read_table(fmt.caption_file(tmp_path / "caps", shard)).to_pylist()}
    assert rows["000000001"]["caption"] == "a red fox in the snow" and rows["000000001"]["num_tokens"] == 0


def test_a_refused_start_leaves_nothing_that_blocks(ray_local, tiny_models, tmp_path, capsys):
    """A first start that wrote only fingerprint.json (another t5_tokenizer and guard, as a run without
    --profile did) does not block the next one with other settings: it restarts, in one line."""
    shard = tmp_path / "cur" / "shards" / "00000.tar"
    write_shard(shard, ALT)
    caps = tmp_path / "caps"
    caps.mkdir()
    (caps / "fingerprint.json").write_text(json.dumps({"t5_tokenizer": "google/t5-v1_1-xxl", "guard": {}}))
    recaption.main(["--shards", str(shard.parent), "--out", str(caps), "--captioner", "original", "--profile", "demo"])
    err = capsys.readouterr().err
    restart = [line for line in err.splitlines() if "no output yet" in line]
    assert len(restart) == 1 and "restarting with the new" in restart[0] and "t5_tokenizer" in restart[0], err
    assert pq.read_table(fmt.caption_file(caps, shard)).num_rows == 3
