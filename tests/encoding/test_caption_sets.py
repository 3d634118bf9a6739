"""encoding/encode with caption sets: three sources and a derived set, and sets added to a folder made
before caption sets existed (by the code of that time), its tars untouched."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from encoders import t5
from encoding import actors, clipscore, encode, sets
from shards import encoded, loader, reasons
from shards.errors import SigmaError
from tests.shards.synthetic import ROOT, caption, sample, write_curated

BEFORE_SETS = "d474147"  # main before caption sets: its encode writes the version 1 layout
SHARDS = [
    [sample(1, 300, 260), sample(2, 512, 256), sample(3, 260, 300)],
    [sample(10, 300, 260), sample(11, 256, 256), sample(12, 310, 270)],
]
KEYS = ["000000001", "000000002", "000000003", "000000010", "000000011", "000000012"]


def qwen_caption(key: str) -> str:
    return f"A picture number {int(key)}. It shows {caption(int(key) + 7, 12)}."


def write_table(path: Path, keys: list[str]) -> Path:
    """A `key, caption` jsonl made elsewhere (a second captioner): sample 12 is not in it."""
    path.write_text("".join(json.dumps({"key": k, "caption": qwen_caption(k)}) + "\n" for k in keys))
    return path


def args(root: Path, models: dict, out: str, *captions: str, first: tuple[str, ...] = ()) -> list[str]:
    out_args = ["--images", str(root / "curated" / "shards" / "*.tar"), "--out", str(root / out), "--tier", "256"]
    for c in captions:
        out_args += ["--captions", c]
    for f in first:
        out_args += ["--first-sentence", f]
    sets_ = [f"models.t5={models['t5']}", f"models.vae={models['vae']}", "encode.shard_bytes=20000"]
    return [*out_args, "--profile", "demo", *[a for s in sets_ for a in ("--set", s)]]


def printed_summary(out: str) -> dict:
    return json.loads(out[out.index('{\n  "out"') :])


def digests(folder: Path, pattern: str) -> dict[str, str]:
    """sha256 of the files whose name matches the regular expression `pattern`."""
    found = [p for p in folder.rglob("*") if re.fullmatch(pattern, p.name)]
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in found}


def t5_of(models: dict, text: str) -> torch.Tensor:
    tok, model = t5.load_tokenizer(models["t5"]), t5.load_t5(models["t5"], "float32", "cpu")
    feats, _ = t5.encode_captions(tok, model, [text], 300)
    return feats[0].float()


def tiny_clip():
    from common import config

    c = config.load(ROOT / "pipelines.yaml", "demo").models.clip
    return clipscore.CaptionClipScore(c.arch, c.weights, c.config_dir)


def text_embedding(scorer, text: str) -> np.ndarray:
    with torch.no_grad():
        e = scorer.model.encode_text(scorer.tokenizer([text])).float()[0]
    return (e / e.norm()).numpy().astype(np.float16)


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("sets")
    write_curated(root, SHARDS)
    write_table(root / "qwen.jsonl", [k for k in KEYS if k != "000000012"])
    # curation's image embedding of sample 1: its recaption's own text embedding, so that caption scores ~100
    recaption = pq.read_table(root / "captions" / "00000.parquet").to_pandas().set_index("key").loc["000000001"]
    emb = text_embedding(tiny_clip(), recaption["caption"]).tobytes()
    (root / "curated" / "dedup_index").mkdir()
    table = pa.table({"key": ["000000001"], "pixels": [1], "sha256": [""], "phash": [""], "embedding": [emb]})
    pq.write_table(table, root / "curated" / "dedup_index" / "00000.parquet")
    return root


def test_clip_score_is_torchmetrics_definition_and_truncates_at_77_tokens(tiny_models):
    scorer = tiny_clip()
    a, b = "a red fox in the snow", "a small wooden house near a lake"
    img = text_embedding(scorer, a)
    cos = float(
        torch.from_numpy(img.astype(np.float32)) @ torch.from_numpy(text_embedding(scorer, b).astype(np.float32))
    )
    ours = scorer.scores([img, img], [a, b])
    assert abs(ours[0] - 100) < 0.5 and abs(ours[1] - 100 * max(cos, 0)) < 0.5
    long = " ".join(["fox"] * 60 + ["house"] * 200)  # beyond 77 tokens: only the opening is read
    opening = " ".join(["fox"] * 60 + ["house"] * 15)
    assert abs(scorer.scores([img], [long])[0] - scorer.scores([img], [opening])[0]) < 1e-3
    assert all(s >= 0 for s in scorer.scores([img] * 3, ["x", "y", "z"]))  # clamped at 0


def test_parse_and_bad_sets_are_one_line():
    plan = sets.parse(["caps", "qwen=tables/q.jsonl", "odd=name=x"], ["short=qwen"])
    assert plan.sources == {"recaption": "caps", "qwen": "tables/q.jsonl", "odd": "name=x"}
    assert plan.names == ["recaption", "qwen", "odd", "original", "short"]
    for captions, first, message in [
        (["qwen=a", "qwen=b"], [], "'qwen' is given twice"),
        (["a", "b"], [], "'recaption' is given twice"),
        (["original=a"], [], "built-in set of the curated alt texts"),
        (["a"], ["short=llava"], "no set 'llava' in this run"),
        (["a"], ["Short=recaption"], r"\[a-z0-9_\]\+"),
        (["a"], ["short=recaption", "short=original"], "'short' is given twice"),
    ]:
        with pytest.raises(SigmaError, match=message) as e:
            sets.parse(captions, first)
        assert "\n" not in str(e.value)
    assert sets.first_sentence("A red fox. It sits in the snow.") == "A red fox."
    assert sets.first_sentence("A fox on a hill at 3.5 km! Snow.") == "A fox on a hill at 3.5 km!"
    assert sets.first_sentence("no full stop at all") == "no full stop at all"


def test_sample_captions_fail_only_when_no_named_set_has_one():
    kept = {"status": "kept", "caption": "A fox. In snow.", "original_caption": None}
    texts, why = sets.sample_captions({"recaption": None, "qwen": kept}, "alt text", {"short": "qwen"})
    assert why == "" and texts == {"qwen": "A fox. In snow.", "original": "alt text", "short": "A fox."}
    texts, why = sets.sample_captions({"recaption": None, "qwen": {"status": "failed", "reason": ""}}, "alt", {})
    assert texts == {} and why == reasons.MISSING_CAPTION  # the first set's reason


def test_t5_stage_encodes_every_set_of_a_sample(shard_models):
    row = {**actors.ROW, "key": "a", "captions": json.dumps({"recaption": "a red fox", "short": "fox"})}
    batch = {k: [v] for k, v in row.items()}
    out = actors.T5Stage(str(shard_models["t5"]), "float32", 300)(batch)
    feats = encoded.unpack(out["t5"][0])
    assert set(feats) == {"recaption", "short"} and json.loads(out["t5_lens"][0]) == {
        n: f.shape[0] for n, f in feats.items()
    }


def test_three_sets_and_a_derived_one(data, shard_models, ray_local, capsys):
    encode.main(
        args(data, shard_models, "enc", str(data / "captions"), f"qwen={data / 'qwen.jsonl'}", first=("short=qwen",))
    )
    summary = printed_summary(capsys.readouterr().out)
    enc = data / "enc"
    assert summary["caption_sets"] == {"recaption": 6, "qwen": 5, "original": 6, "short": 5}
    assert Path(summary["caption_sets_summary"]) == enc / "caption_sets.json"
    report = json.loads((enc / "caption_sets.json").read_text())
    assert report["qwen"]["missing"] == 1 and set(report["qwen"]["clip_score"]) >= {"min", "median", "max"}
    assert report["recaption"]["lowest"] and report["recaption"]["clip_score"]["max"] > 99  # sample 1 (below)
    info = encoded.read_info(enc)
    assert info["format_version"] == 2 and list(info["caption_sets"]) == ["recaption", "qwen", "original", "short"]
    for tar in encoded.committed_shards(enc):
        assert sorted(encoded.set_files(tar)) == ["original", "qwen", "recaption", "short"]
        with tarfile.open(tar) as t:
            assert not [m.name for m in t if m.name.endswith(encoded.T5)]  # latents only
    rows = {
        r["key"]: r for tar in encoded.committed_shards(enc) for r in encoded.read_set(encoded.set_file(tar, "short"))
    }
    assert rows["000000012"]["t5"] is None and rows["000000001"]["caption"] == "A picture number 1."
    torch.testing.assert_close(
        encoded.set_features(rows["000000001"], info["t5_dim"]).float(),
        t5_of(shard_models, "A picture number 1."),
        atol=2e-3,
        rtol=2e-3,
    )
    index = pq.read_table(enc / encoded.INDEX).to_pandas().set_index("key")
    assert index.loc["000000012", "t5_len_qwen"] == 0 and index.loc["000000001", "t5_len_short"] > 0
    # CLIP-Scores: sample 1 scored with curation's embedding (its recaption's text: ~100), others embedded here
    assert index.loc["000000001", "clip_recaption"] > 99 and index["clip_qwen"].notna().sum() == 5
    assert index.loc[[k for k in KEYS if k != "000000001"], "clip_recaption"].lt(99).all()
    assert "clip_embedding" not in index.columns
    got = {
        key: b["caption"][r]
        for b in loader.make_loader(
            enc, batch_size=1, num_workers=0, resample=False, rule=loader.caption_rule({"short": 1})
        )
        for r, key in enumerate(b["keys"])
    }
    assert got == {k: qwen_caption(k).split(". ")[0] + "." for k in KEYS if k != "000000012"}


def test_sets_added_to_a_folder_made_before_caption_sets(data, shard_models, ray_local, tmp_path, capsys):
    old_code = tmp_path / "old"
    old_code.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", BEFORE_SETS], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(old_code)], input=archive, check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # its own Ray, with its own code
    env["PYTHONPATH"] = str(old_code)
    old = subprocess.run(
        [
            sys.executable,
            str(old_code / "encoding" / "encode"),
            *args(data, shard_models, "old", str(data / "captions")),
        ],
        env=env,
        cwd=old_code,  # Ray's local workers put the driver's folder first on their path
        capture_output=True,
        text=True,
    )
    assert old.returncode == 0, old.stderr[-2000:]
    enc = data / "old"
    assert json.loads((enc / encoded.INFO).read_text())["format_version"] == 1
    tars = digests(enc, r".*\.tar")
    rows = digests(enc, r"[0-9a-f]{8}-\d{5}\.parquet")
    encode.main(
        args(data, shard_models, "old", str(data / "captions"), f"qwen={data / 'qwen.jsonl'}", first=("short=qwen",))
    )
    summary = printed_summary(capsys.readouterr().out)
    assert summary["encoded_now"] == 0 and summary["caption_set_files_added"] == 2 * len(tars)
    assert digests(enc, r".*\.tar") == tars and digests(enc, r"[0-9a-f]{8}-\d{5}\.parquet") == rows  # latents untouched
    assert summary["caption_sets"] == {"recaption": 6, "original": 6, "qwen": 5, "short": 5}
    counts: dict[str, int] = {}
    rule = loader.caption_rule({"recaption": 1, "original": 1, "qwen": 1, "short": 1})
    for b in loader.make_loader(enc, batch_size=1, num_workers=0, resample=False, rule=rule, seed=2):
        src, key = b["caption_source"][0], b["keys"][0]
        counts[src] = counts.get(src, 0) + 1
        if src == "qwen":
            assert b["caption"][0] == qwen_caption(key)
    assert sum(counts.values()) == 6
    # a set given again from other files is refused, naming it
    write_table(data / "qwen2.jsonl", KEYS)
    with pytest.raises(SystemExit) as e:
        encode.main(args(data, shard_models, "old", f"qwen={data / 'qwen2.jsonl'}"))
    assert e.value.code == 2 and "made with another --captions qwen" in capsys.readouterr().err
