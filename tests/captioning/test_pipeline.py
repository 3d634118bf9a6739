"""The recaption stage end to end through Ray with the real tiny LLaVA: outputs, failure rows, resume."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from captioning import recaption
from shards import format as fmt
from shards import reasons
from tests.shards.test_curated import cut_after, write_tar
from tests.terminal import RATE_AND_ETA, on_terminal

ROOT = Path(__file__).resolve().parents[2]
ENV = {
    **os.environ,
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
}


def _cli(cap_models, *args):
    return [
        sys.executable,
        str(ROOT / "captioning" / "recaption"),
        "--profile",
        "demo",
        "--set",
        f"captioning.captioners.hf.model={cap_models['captioner']}",
        "--set",
        f"models.t5={cap_models['t5']}",
        *args,
    ]


def test_end_to_end_through_ray(ray_local, cap_cfg, cap_models, make_shards, tmp_path):
    from encoders import t5

    shards = make_shards(tmp_path / "cur", 2, 5, corrupt={"000010003"})
    capdir = tmp_path / "caps"
    with on_terminal() as tty:  # as in a user's shell: a progress bar with rate and ETA, per-shard lines above it
        summary = recaption.run(cap_cfg, str(tmp_path / "cur" / "shards" / "{00000..00001}.tar"), str(capdir))
    assert "recaption: 100%" in tty.text and "10/10" in tty.text, tty.text
    assert re.search(RATE_AND_ETA.format(unit="caption"), tty.text) and "00001.parquet: 5 rows" in tty.text, tty.text
    assert summary["written"] == 2 and summary["skipped"] == 0
    assert summary["captions"] + sum(summary["failed"].values()) == 10
    assert summary["failed"].get(reasons.NOT_AN_IMAGE) == 1

    tok = t5.load_tokenizer(str(cap_models["t5"]))
    for shard in shards:
        table = pq.read_table(fmt.caption_file(capdir, shard))
        assert table.column_names == fmt.CAPTION_COLUMNS
        rows = table.to_pylist()
        assert [r["key"] for r in rows] == [f"{fmt.shard_index(shard):05d}{i:04d}" for i in range(5)]  # tar order
        for r in rows:
            assert r["captioner"] == f"{cap_models['captioner']}@local"
            assert r["prompt"] == "Describe this image in detail."
            assert r["original_caption"] == f"alt text {r['key']}"
            if r["key"] == "000010003":
                assert (r["status"], r["reason"], r["caption"], r["num_tokens"]) == (
                    reasons.FAILED,
                    reasons.NOT_AN_IMAGE,
                    "",
                    0,
                )
            elif r["status"] == reasons.KEPT:
                assert r["reason"] == "" and r["caption"] == " ".join(r["caption"].split())
                assert r["num_tokens"] == len(tok(r["caption"]).input_ids)
            else:  # the random-weight model may emit only special tokens: an empty caption is a failure row
                assert r["reason"] == reasons.EMPTY_CAPTION
    assert not list(capdir.glob(".*.tmp"))

    before = {p.name: p.stat().st_mtime_ns for p in capdir.iterdir()}
    again = recaption.run(cap_cfg, str(tmp_path / "cur" / "shards"), str(capdir))  # a directory works too
    assert (again["skipped"], again["written"]) == (2, 0)
    assert {p.name: p.stat().st_mtime_ns for p in capdir.iterdir()} == before


def test_dry_run_and_bad_input_messages(cap_models, make_shards, tmp_path):
    make_shards(tmp_path / "cur", 3, 1)
    (tmp_path / "caps").mkdir()
    (tmp_path / "caps" / "00001.parquet").write_bytes(b"done earlier")
    out = subprocess.run(
        _cli(
            cap_models,
            "--shards",
            str(tmp_path / "cur" / "shards" / "*.tar"),
            "--out",
            str(tmp_path / "caps"),
            "--dry-run",
        ),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert [Path(p).name for p in plan["todo"]] == ["00000.tar", "00002.tar"]
    assert plan["backend"] == "hf" and plan["resources"]["batch_size"] == 8

    bad = subprocess.run(
        _cli(cap_models, "--shards", str(tmp_path / "nope" / "{00000..00003}.tar"), "--out", str(tmp_path / "caps")),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: --shards ") and "no such file" in bad.stderr
    bad = subprocess.run(
        _cli(
            cap_models,
            "--shards",
            str(tmp_path / "cur" / "shards"),
            "--out",
            str(tmp_path / "c2"),
            "--captioner",
            "llava-9000",
        ),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "captioning.captioners.llava-9000: no such captioner" in bad.stderr


def test_resume_after_kill(ray_local, cap_models, make_cfg, make_shards, tmp_path):
    """Kill a run once some shards are written; the rerun skips them and leaves no partial file."""
    n = 6
    make_shards(tmp_path / "cur", n, 4)
    capdir = tmp_path / "caps"
    overrides = ["captioning.captioners.hf.max_new_tokens=48", "captioning.captioners.hf.resources.batch_size=4"]
    cmd = _cli(
        cap_models,
        "--shards",
        str(tmp_path / "cur" / "shards"),
        "--out",
        str(capdir),
        *[a for o in overrides for a in ("--set", o)],
    )
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 150
        while time.time() < deadline and not list(capdir.glob("*.parquet")) and proc.poll() is None:
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started (its own session)
        proc.wait()
    first = {p.name: p.stat().st_mtime_ns for p in capdir.glob("*.parquet")}
    assert 1 <= len(first) < n, proc.stdout.read().decode()[-2000:]
    (capdir / ".00005.parquet.killed.tmp").write_bytes(b"half a file")  # what a kill mid-write leaves

    # The rerun, in-process; a 3-token budget so the over-budget report has something to count.
    summary = recaption.run(
        make_cfg(*overrides, "captioning.token_budget=3"), str(tmp_path / "cur" / "shards"), str(capdir)
    )
    assert summary["skipped"] == len(first) and summary["written"] == n - len(first)
    rerun = [pq.read_table(p).to_pylist() for p in sorted(capdir.glob("*.parquet")) if p.name not in first]
    assert summary["over_budget"] == sum(r["num_tokens"] > 3 for rows in rerun for r in rows) > 0
    assert sorted(p.name for p in capdir.iterdir() if p.name != ".lock") == [
        fmt.caption_file("", f"{i:05d}.tar").name for i in range(n)
    ] + [
        "fingerprint.json",
        "report.html",
    ]  # no temp files
    assert {name: (capdir / name).stat().st_mtime_ns for name in first} == first  # finished shards untouched
    for i in range(n):
        assert pq.read_table(capdir / f"{i:05d}.parquet").num_rows == 4


def test_unreadable_tar_is_reported_and_left_for_the_next_run(cap_cfg, tmp_path):
    bad = tmp_path / "cur" / "shards" / "00000.tar"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\x00garbage" * 200)  # not a tar: listing fails before any Ray work
    summary = recaption.run(cap_cfg, str(bad), str(tmp_path / "caps"))
    assert summary["corrupt_shards"] == [str(bad)] and summary["written"] == 0
    from shards import fingerprint

    left = sorted(p.name for p in (tmp_path / "caps").iterdir())
    assert left == sorted(["fingerprint.json", fingerprint.LOCK])  # no caption file


def test_recaption_refuses_a_tar_cut_at_a_member_boundary(cap_cfg, tmp_path):
    tar = write_tar(tmp_path / "cur" / "shards" / "00000.tar", ["x.jpg", "x.txt", "y.jpg", "y.txt"])
    cut_after(tar, 2)
    summary = recaption.run(cap_cfg, str(tar), str(tmp_path / "caps"))
    assert summary["corrupt_shards"] == [str(tar)] and summary["written"] == 0
    assert not list((tmp_path / "caps").glob("*.parquet"))


def test_a_resume_with_other_settings_or_a_changed_shard_is_refused(make_cfg, tmp_path):
    """Issue 15 item 2: a finished CAPDIR never answers for other settings or a changed tar."""
    import tarfile as tf

    from shards.errors import SigmaError

    tar = tmp_path / "cur" / "shards" / "00000.tar"
    tar.parent.mkdir(parents=True)
    with tf.open(tar, "w"):  # a shard with no samples: written without starting Ray
        pass
    caps = tmp_path / "caps"
    assert recaption.run(make_cfg(), str(tar), str(caps))["written"] == 1
    with pytest.raises(SigmaError, match=r"made with another prompt \(see fingerprint.json\)"):
        recaption.run(make_cfg("captioning.captioners.hf.prompt=Say something else."), str(tar), str(caps))
    assert recaption.run(make_cfg("captioning.token_budget=5"), str(tar), str(caps))["skipped"] == 1  # reporting only
    with tf.open(tar, "w") as t:  # the same name, other content (folders only: still no samples)
        for i in range(30):
            info = tf.TarInfo(f"folder{i}")
            info.type = tf.DIRTYPE
            t.addfile(info)
    with pytest.raises(SigmaError, match=r"00000.tar: changed since .*00000.parquet was written from it"):
        recaption.run(make_cfg(), str(tar), str(caps))


def test_a_full_disk_is_one_line(cap_models, small_disk, tmp_path):
    import tarfile as tf

    tar = tmp_path / "cur" / "shards" / "00000.tar"
    tar.parent.mkdir(parents=True)
    with tf.open(tar, "w"):  # no samples: its (empty) parquet is written without Ray
        pass
    caps = small_disk(4096) / "caps"  # one page: fingerprint.json, then nothing
    r = subprocess.run(
        _cli(cap_models, "--shards", str(tar), "--out", str(caps)),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=ENV,
        timeout=300,
    )
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "disk full" in r.stderr, r.stderr
    assert str(caps) in r.stderr and not list(caps.glob(".*.tmp"))
