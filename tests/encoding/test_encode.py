"""encoding/encode end to end on real Ray: tier rule, failures as rows, shard layout, resume, entry point."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from encoders import t5, vae
from encoding import actors, encode
from shards import encoded, reasons
from shards.errors import SigmaError
from tests.shards.synthetic import ROOT, image_bytes, sample, truncate, write_curated
from tests.terminal import RATE_AND_ETA, on_terminal

EXPECTED = {  # key -> (status, reason)
    "000000001": ("kept", ""),
    "000000002": ("kept", ""),
    "000000003": ("rejected", reasons.NOT_IN_TIER),
    "000000004": ("kept", ""),
    "000000005": ("failed", reasons.NOT_AN_IMAGE),
    "000000010": ("kept", ""),
    "000000011": ("failed", reasons.CAPTION_ERROR),
    "000000012": ("kept", ""),
    "000000013": ("failed", reasons.MISSING_CAPTION),
    "000000014": ("kept", ""),
    "000000015": ("kept", ""),
    "000000020": ("failed", reasons.CORRUPT_SHARD),
    "000000021": ("failed", reasons.CORRUPT_SHARD),
}
SHARDS = [
    [
        sample(1, 300, 260),
        sample(2, 512, 256),
        sample(3, 200, 200),
        sample(4, 260, 300, ext="png"),
        sample(5, 300, 300, data=b"<html>not an image</html>"),
    ],
    [
        sample(10, 300, 260),
        sample(11, 300, 260),
        sample(12, 256, 256, ext="webp"),
        sample(13, 300, 260),
        sample(14, 310, 270),
        sample(15, 320, 280),
    ],
    [sample(20, 300, 260), sample(21, 300, 260)],
]


def encode_args(root: Path, models: dict, *extra: str) -> list[str]:
    return [
        "--images",
        str(root / "curated" / "shards" / "*.tar"),
        "--captions",
        str(root / "captions"),
        "--out",
        str(root / "enc"),
        "--tier",
        "256",
        "--profile",
        "demo",
        "--set",
        f"models.t5={models['t5']}",
        "--set",
        f"models.vae={models['vae']}",
        "--set",
        "encode.shard_bytes=40000",
        "--set",
        "encode.vae_resources.batch_size=3",
        *extra,
    ]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, shard_models, ray_local):
    root = tmp_path_factory.mktemp("encode")
    write_curated(root, SHARDS, skip_captions={"000000013"}, failed_captions={"000000011"})
    truncate(root / "curated" / "shards" / "00002.tar", 0.6)
    encode.main(encode_args(root, shard_models))
    return root


def index(root: Path) -> pd.DataFrame:
    return pq.read_table(root / "enc" / encoded.INDEX).to_pandas().set_index("key")


def read_tar(path: Path) -> dict[str, dict]:
    out: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for m in tar:
            key, _, suffix = m.name.partition(".")
            out.setdefault(key, {})[suffix] = tar.extractfile(m).read()
    return out


def test_every_sample_has_a_row_with_its_reason(first_run):
    idx = index(first_run)
    assert {k: (r.status, r.reason) for k, r in idx.iterrows()} == EXPECTED
    kept = idx[idx.status == "kept"]
    assert (kept.shard != "").all() and (idx[idx.status != "kept"].shard == "").all()
    assert (
        kept.loc["000000002", "bucket"] == "0.5"
        and (kept.loc["000000002", ["bucket_h", "bucket_w"]] == [176, 352]).all()
    )
    assert kept.loc["000000004", "bucket_h"] == 272  # portrait 260x300 -> 1.13 bucket (272x240)


def test_shards_group_by_bucket_and_roll_by_size(first_run):
    idx = index(first_run)
    enc = first_run / "enc"
    tars = [t.local for t in encoded.committed_shards(enc)]  # Locs: here on disk
    assert all(t.with_suffix(".parquet").exists() for t in tars)
    for tar in tars:
        samples = read_tar(tar)
        hws = {tuple(json.loads(s["json"])["bucket_hw"]) for s in samples.values()}
        assert len(hws) == 1 and tar.parent.name == "{}x{}".format(*hws.pop())
        assert all(set(s) == {"json", "vae.safetensors"} for s in samples.values())  # captions: side files
        assert sorted(encoded.set_files(tar)) == ["original", "recaption"]
    in_088 = [t for t in tars if t.parent.name == "240x272"]
    assert len(in_088) >= 2  # 4 samples of ~20 kB with shard_bytes=40000
    assert sorted(idx[idx.bucket_h == 240].index) == ["000000001", "000000010", "000000014", "000000015"]


def test_stored_tensors_match_the_libraries(first_run, shard_models):
    """Stored features = T5EncoderModel on the valid tokens; stored mean = AutoencoderKL latent mean (fp16)."""
    from diffusers import AutoencoderKL
    from transformers import T5EncoderModel

    idx = index(first_run)
    tar = first_run / "enc" / idx.loc["000000010", "shard"]
    sample10 = read_tar(tar)["000000010"]
    meta = json.loads(sample10["json"])
    lat = encoded.unpack(sample10["vae.safetensors"])
    tok = t5.load_tokenizer(shard_models["t5"])
    model = T5EncoderModel.from_pretrained(shard_models["t5"]).eval()
    dim = encoded.read_info(first_run / "enc")["t5_dim"]
    for source in ("recaption", "original"):
        row = next(r for r in encoded.read_set(encoded.set_file(tar, source)) if r["key"] == "000000010")
        feats = encoded.set_features(row, dim)
        ids = tok(row["caption"], return_tensors="pt").input_ids
        with torch.no_grad():
            ref = model(input_ids=ids).last_hidden_state[0]
        assert feats.dtype == torch.float16 and feats.shape == ref.shape
        assert row["t5_len"] == ref.shape[0] == idx.loc["000000010", f"t5_len_{source}"]
        torch.testing.assert_close(feats.float(), ref, atol=2e-3, rtol=2e-3)
    img = vae.open_image(image_bytes(300, 260, 10))
    pixels, box = vae.preprocess(img, (240, 272))
    assert meta["crop_box"] == list(box) and meta["size"] == [260, 300] and meta["bucket_hw"] == [240, 272]
    with torch.no_grad():
        ref = AutoencoderKL.from_pretrained(shard_models["vae"]).eval().encode(pixels[None]).latent_dist
    assert lat["mean"].shape == (4, 30, 34) and lat["mean"].dtype == torch.float16
    torch.testing.assert_close(lat["mean"].float(), ref.mean[0], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lat["std"].float(), ref.std[0], atol=2e-3, rtol=2e-3)


def test_info_records_vae_and_null_caption(first_run):
    from shards import loader

    info = encoded.read_info(first_run / "enc")
    assert info["scaling_factor"] == 0.13025 and info["latent_channels"] == 4 and info["tier"] == "256"
    assert info["t5_dim"] == 32 and info["max_length"] == 300
    for model in ("t5", "vae"):  # which models, for the runs trained on it (training/runs.py)
        assert info[f"{model}_id"] == encoded.model_id(info[model]) != info[model] and info[f"{model}_revision"] is None
    assert loader.null_caption(first_run / "enc").shape == (300, 32)
    loader.check_vae(first_run / "enc", 0.13025, 4)
    with pytest.raises(SigmaError, match="scaling_factor"):
        loader.check_vae(first_run / "enc", 0.18215, 4)


def test_rerun_encodes_only_what_is_missing(first_run, shard_models, capsys):
    """A lost shard and a caption that arrived since: only those samples are encoded; the rest stays byte-identical."""
    enc = first_run / "enc"
    lost = enc / index(first_run).loc["000000002", "shard"]
    lost.unlink()
    before = {p: p.read_bytes() for p in encoded.committed_shards(enc)}
    cap = first_run / "captions" / "00001.parquet"
    rows = pq.read_table(cap).to_pylist()
    rows.append({**rows[0], "key": "000000013", "caption": "a fox near a lake"})
    pq.write_table(pq.read_table(cap).from_pylist(rows), cap)
    with pytest.raises(SystemExit) as e:  # a changed input is refused by default (issue 15 item 2) ...
        encode.main(encode_args(first_run, shard_models))
    assert e.value.code == 2 and "made with another --captions" in capsys.readouterr().err
    with (
        on_terminal() as tty
    ):  # ... and accepted with --reencode; as in a user's shell: a progress bar with rate and ETA
        summary = encode.run(
            _cfg(shard_models),
            str(first_run / "curated" / "shards" / "*.tar"),
            str(first_run / "captions"),
            str(enc),
            "256",
            reencode=True,
        )
    assert "encode 256:" in tty.text and re.search(RATE_AND_ETA.format(unit="sample"), tty.text), tty.text
    # the lost tar's row file and its two caption-set files (recaption, original)
    assert summary["encoded_now"] == 2 and summary["removed_stale_or_partial"] == 3
    after = {p: p.read_bytes() for p in encoded.committed_shards(enc)}
    assert all(after[p] == data for p, data in before.items()) and len(after) == len(before) + 2
    idx = index(first_run)
    assert idx.loc["000000013", "status"] == "kept" and idx.loc["000000002", "status"] == "kept"
    assert {k: (r.status, r.reason) for k, r in idx.drop("000000013").iterrows()} == {
        k: v for k, v in EXPECTED.items() if k != "000000013"
    }


def _cfg(models):
    from common import config

    return config.load(
        ROOT / "pipelines.yaml",
        "demo",
        [f"models.t5={models['t5']}", f"models.vae={models['vae']}", "encode.shard_bytes=40000"],
    )


def test_other_settings_into_same_out_are_refused_in_one_line(first_run, shard_models, capsys):
    before = {p: p.stat().st_mtime_ns for p in (first_run / "enc").rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as e:
        encode.main(encode_args(first_run, shard_models, "--set", "encode.t5_max_length=120"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "made with another encode.t5_max_length" in err, err
    assert "--reencode" in err
    assert {p: p.stat().st_mtime_ns for p in (first_run / "enc").rglob("*") if p.is_file()} == before


def test_other_tier_into_same_out_is_refused(first_run, shard_models, capsys):
    args = encode_args(first_run, shard_models)
    args[args.index("--tier") + 1] = "512"
    with pytest.raises(SystemExit) as e:
        encode.main(args)
    assert e.value.code == 2 and "holds tier 256" in capsys.readouterr().err


def test_fingerprint_change_marks_shards_stale(first_run, shard_models, tmp_path):
    cfg = _cfg(shard_models)
    fp = encode.plan(cfg, "x", "y", "z", "256")["fingerprint"]
    cfg.encode.t5_max_length = 120
    assert encode.plan(cfg, "x", "y", "z", "256")["fingerprint"] != fp
    cfg.encode.t5_max_length = 300
    cfg.models.vae = str(vae.build_tiny(tmp_path / "vae", seed=1))  # same name, config and size; other weights
    assert encode.plan(cfg, "x", "y", "z", "256")["fingerprint"] != fp
    cfg.models.vae = str(vae.build_tiny(tmp_path / "again" / "vae"))  # the same weights rebuilt elsewhere
    assert encode.plan(cfg, "x", "y", "z", "256")["fingerprint"] == fp
    enc = first_run / "enc"
    n = len(encoded.committed_shards(enc))
    assert encoded.remove_stale(enc, fp) == 0 and len(encoded.committed_shards(enc)) == n
    assert encoded.remove_stale(enc, "0" * 16) == n and encoded.committed_shards(enc) == []


def test_entry_point_help_and_dry_run(tmp_path, shard_models, capsys):
    with pytest.raises(SystemExit) as e:
        encode.main(["--help"])
    help_text = capsys.readouterr().out
    assert e.value.code == 0 and "--tier" in help_text and "example:" in help_text
    exe = [sys.executable, str(ROOT / "encoding" / "encode")]
    write_curated(tmp_path, [[sample(1, 300, 260)]])
    out = subprocess.run(
        [*exe, *encode_args(tmp_path, shard_models), "--dry-run"], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["shards"] == 1 and plan["table"] == "256" and len(plan["fingerprint"]) == 16
    out = subprocess.run(
        [*exe, *encode_args(tmp_path / "nothing", shard_models)], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 2 and out.stderr.startswith("error: --images") and "\n" == out.stderr[-1]
    args = encode_args(tmp_path, shard_models, "--dry-run")
    args[args.index("--captions") + 1] = str(tmp_path / "no-captions")
    out = subprocess.run([*exe, *args], capture_output=True, text=True, cwd=ROOT)  # --dry-run checks inputs it has
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["not_checked"] == [f"--captions {tmp_path / 'no-captions'}: no such file or folder"]
    assert "dry run: not checked: --captions" in out.stderr
    args[args.index("--dry-run")] = "--reencode"
    out = subprocess.run([*exe, *args], capture_output=True, text=True, cwd=ROOT)  # a real run refuses them
    assert out.returncode == 2 and out.stderr.startswith("error: --captions") and out.stderr.count("\n") == 1, (
        out.stderr
    )


def test_read_shard_cut_at_a_member_boundary_is_corrupt(tmp_path):
    """tarfile alone reads such a cut as a shorter, valid archive; the stage must not."""
    shards, caps = write_curated(tmp_path, [[sample(1, 300, 260), sample(2, 300, 260)]])
    tar_path = shards / "00000.tar"
    with tarfile.open(tar_path) as tar:
        members = tar.getmembers()
    end_of_first = members[2].offset_data + ((members[2].size + 511) // 512) * 512  # after 000000001's 3 members
    tar_path.write_bytes(tar_path.read_bytes()[:end_of_first])
    (caps / "00000.parquet").unlink()  # and no caption file: the keys read before the cut are still listed
    task = {"shard": str(tar_path), "captions": {"recaption": str(caps / "00000.parquet")}, "derived": {}, "done": []}
    rows = list(actors.read_shard(task, "256"))
    assert [(r["key"], r["status"], r["reason"]) for r in rows] == [("000000001", "failed", reasons.CORRUPT_SHARD)]
    write_curated(tmp_path / "ok", [[sample(1, 300, 260), sample(2, 300, 260)]])
    ok = tmp_path / "ok"
    task = {
        "shard": str(ok / "curated" / "shards" / "00000.tar"),
        "captions": {"recaption": str(ok / "nope.parquet")},
        "derived": {},
        "done": ["000000002"],
    }
    rows = list(actors.read_shard(task, "256"))
    assert [(r["key"], r["reason"]) for r in rows] == [("000000001", reasons.MISSING_CAPTION)]  # 2 is done: skipped


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_leaves_no_temp_file(ray_local, shard_models, small_disk, tmp_path, capsys):
    write_curated(tmp_path, SHARDS[:2])
    disk = small_disk(48 * 1024)  # fingerprint.json fits, the first training tar does not
    args = encode_args(tmp_path, shard_models)
    args[args.index("--out") + 1] = str(disk / "enc")
    with pytest.raises(SystemExit) as e:
        encode.main(args)
    err = capsys.readouterr().err.strip()  # Ray workers' own log lines may come first
    assert e.value.code == 2 and "Traceback" not in err and err.count("error:") == 1, err[-3000:]
    assert err.splitlines()[-1].startswith(f"error: {disk}") and "disk full" in err.splitlines()[-1]
    assert not [p for p in (disk / "enc").rglob("*") if p.name.endswith(".tmp")]
