"""A run folder on an object store (issue 30, moto's S3 server on loopback): training/finetune --data s3://...
--out s3://..., kill -9 and resume on a "new machine" (a fresh local temp and an empty shard cache,
nothing of the first process left), an incomplete checkpoint never chosen, the same losses and
weights as the same run on disk, and training/sample and training/export reading the run from the
bucket."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from shards import storage
from tests.conftest import S3_SECRET
from tests.training import encdata
from training import checkpoint, finetune, runfolder, summary

ROOT = Path(__file__).resolve().parents[2]
STEPS = 6
GRID = (
    "--set",
    "training.sample_every=4",
    "--set",
    "training.sample_steps=1",
    "--set",
    "training.sample_prompts=[a fox]",
)


@pytest.fixture(scope="module")
def enc(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    return encdata.write(root / "enc-512", "512", encdata.TIER_BUCKETS["512"])


def finetune_args(enc: Path | str, out: str, *extra: str) -> list[str]:
    return encdata.args(
        "512",
        enc,
        Path("unused-runs"),
        "--out",
        out,
        *extra,
        "--set",
        "training.stages.512.parent=null",
        "--set",
        "training.checkpoint_every=2",
        *GRID,
        steps=STEPS,
    )


def losses(text: str) -> dict[int, float]:
    return {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"step (\d+)/\d+ loss ([\d.]+)", text)}


OUTPUTS: list[str] = []  # every command's stdout and stderr, grepped for the secret


def run(cmd: list[str], tmp: Path) -> subprocess.CompletedProcess:
    """A command as on a fresh machine: its own empty TMPDIR (the local copies of a store run live there)."""
    tmp.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TMPDIR": str(tmp)}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    OUTPUTS.extend((r.stdout, r.stderr))
    return r


def test_a_run_on_the_store_resumes_after_kill_9_and_matches_the_disk_run(enc, bucket, tmp_path, tiny_models, capsys):
    # the same run on disk, uninterrupted: the reference
    ref = tmp_path / "ref"
    finetune.main(finetune_args(enc, str(ref)))
    capsys.readouterr()

    import s3fs

    s3fs.S3FileSystem(skip_instance_cache=True).put(str(enc), bucket[5:] + "/enc", recursive=True)
    url = f"{bucket}/runs/512"
    loc = storage.resolve(url)
    cmd = lambda cache: [
        sys.executable,
        "training/finetune",
        *finetune_args(f"{bucket}/enc", url, "--set", f"storage.cache.folder={cache}"),
    ]
    first_tmp, first_cache = tmp_path / "machine-1", tmp_path / "cache-1"
    first_tmp.mkdir()
    proc = subprocess.Popen(
        cmd(first_cache),
        cwd=ROOT,
        env={**os.environ, "TMPDIR": str(first_tmp)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while not checkpoint.list_steps(loc) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    first_out, first_err = proc.communicate()
    killed_at = checkpoint.list_steps(loc)[-1]
    assert killed_at < STEPS, "the run finished before it was killed: nothing resumed"
    assert any(first_cache.iterdir())  # the shards were read through the cache
    shutil.rmtree(first_tmp)  # that machine's disk is gone, its cache too
    shutil.rmtree(first_cache)

    # an incomplete checkpoint (files uploaded, no marker), newer than the committed ones
    fake = loc / "checkpoints" / "step-0000099"
    (fake / checkpoint.MODEL).write_object(b"\0" * 64)
    (fake / checkpoint.STATE).write_object(b"\0" * 64)
    assert checkpoint.list_steps(loc)[-1] == killed_at and checkpoint.latest(loc) == checkpoint.step_dir(loc, killed_at)

    r = run(cmd(tmp_path / "cache-2"), tmp_path / "machine-2")
    assert r.returncode == 0, r.stderr
    assert f"resuming from step {killed_at}" in r.stdout and "step-0000099" not in r.stdout
    assert not fake.iterdir()  # removed at the start
    assert checkpoint.list_steps(loc) == [STEPS - 2, STEPS]  # keep_checkpoints: 2, pruned after the commit
    for step in (STEPS - 2, STEPS):
        ckpt = checkpoint.step_dir(loc, step)
        assert [p.name for p in ckpt.iterdir()] == sorted(
            [checkpoint.MODEL, checkpoint.EMA, checkpoint.STATE, storage.MARKER]
        )
    assert not list((tmp_path / "machine-2").iterdir())  # the local copies (TensorBoard, downloads) cleaned up

    # the same losses and weights as on disk
    a, b = losses((ref / "log.txt").read_text()), losses((loc / "log.txt").read_text())
    assert sorted(b) == list(range(1, STEPS + 1))  # every step in the store's log (rewritten whole)
    for s in range(1, STEPS + 1):
        assert b[s] == pytest.approx(a[s], rel=1e-5, abs=1e-6), s
    wa = checkpoint.load_weights(checkpoint.step_dir(ref, STEPS) / checkpoint.EMA)
    wb = checkpoint.load_weights(checkpoint.step_dir(loc, STEPS) / checkpoint.EMA)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)

    # the rest of the run folder: run.json, fingerprint, grids, TensorBoard, summary, the lease
    names = {p.relative_to(loc) for p in loc.files()}
    assert {"run.json", "fingerprint.json", "log.txt", "summary.html", runfolder.LEASE} <= names, names
    assert {"samples/step-0000004.png", "samples/step-0000006.png"} <= names
    assert json.loads((loc / "run.json").read_text())["rundir"] == url
    events = [n for n in names if n.startswith("tb/events.out.tfevents.")]
    assert len(events) >= 2  # one per process that trained (the killed one uploaded at its checkpoint)
    scalars = summary.read_scalars(loc)  # the event files read back from the store
    assert max(s for s, _ in scalars["train/loss"]) == STEPS
    assert "<img" in (loc / "summary.html").read_text()

    # sample and export from the bucket run
    png = tmp_path / "fox.png"
    r = run(
        [sys.executable, "training/sample", "--run", url, "--prompt", "a fox", "--size", "64x64", "--steps", "2"]
        + ["--profile", "demo", "--out", str(png)],
        tmp_path / "machine-3",
    )
    assert r.returncode == 0, r.stderr
    assert png.is_file() and "ema.safetensors" in r.stdout
    pipe_url = f"{bucket}/export/pixart-512"
    r = run(
        [sys.executable, "training/export", "--run", url, "--diffusers", pipe_url, "--profile", "demo"],
        tmp_path / "machine-3",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"wrote {pipe_url}: PixArtSigmaPipeline from {url}/checkpoints/step-0000006/")
    pipe = storage.resolve(pipe_url)
    assert storage.committed(pipe)
    r = run(
        [sys.executable, "training/export", "--run", url, "--diffusers", f"{bucket}/export/linked"]
        + ["--encoders", "link", "--profile", "demo"],
        tmp_path / "machine-3",
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "a bucket has no links" in r.stderr, r.stderr
    local_pipe = tmp_path / "pipe"
    for f in pipe.files():
        dest = local_pipe / f.relative_to(pipe)
        dest.parent.mkdir(parents=True, exist_ok=True)
        f.download(dest)
    from diffusers import PixArtSigmaPipeline

    pipeline = PixArtSigmaPipeline.from_pretrained(str(local_pipe))
    img = pipeline("a fox", num_inference_steps=2, height=64, width=64).images[0]
    assert img.size == (64, 64)
    ref_pipe = tmp_path / "ref-pipe"
    r = run(
        [sys.executable, "training/export", "--run", str(ref), "--diffusers", str(ref_pipe)]
        + ["--profile", "demo", "--transformer-only"],
        tmp_path / "machine-3",
    )
    assert r.returncode == 0, r.stderr
    from safetensors.torch import load_file

    got = load_file(str(local_pipe / "transformer" / "diffusion_pytorch_model.safetensors"))
    want = load_file(str(ref_pipe / "diffusion_pytorch_model.safetensors"))
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)

    # an evaluation folder in the bucket: images sampled from the bucket run, then scored there
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\na house\n")
    evaldir = f"{bucket}/eval"
    r = run(
        [sys.executable, "training/sample", "--run", url, "--prompts", str(prompts), "--seeds", "0,1"]
        + ["--size", "64x64", "--steps", "2", "--profile", "demo", "--out", f"{evaldir}/images/512"],
        tmp_path / "machine-4",
    )
    assert r.returncode == 0, r.stderr
    r = run(
        [sys.executable, "evaluation/evaluate", evaldir, "--device", "cpu", "--profile", "demo"], tmp_path / "machine-4"
    )
    assert r.returncode == 0, r.stderr
    assert f"wrote {evaldir}/scores.parquet (4 images of 1 models)" in r.stdout
    ev = storage.resolve(evaldir)
    assert {"scores.parquet", "metrics.json", "summary.md"} <= {p.name for p in ev.iterdir()}
    assert len(storage.read_parquet(ev / "scores.parquet")) == 4
    r = run(  # the exported pipeline generates from the bucket into the bucket (copied once into the model cache)
        [sys.executable, "evaluation/generate", "--pipeline", pipe_url, "--prompts", str(prompts), "--seeds", "0"]
        + ["--size", "64x64", "--steps", "2", "--device", "cpu", "--profile", "demo", "--out", f"{evaldir}/images/exp"],
        tmp_path / "machine-5",
    )
    assert r.returncode == 0, r.stderr
    assert len([f for f in (ev / "images" / "exp").files() if f.suffix == ".png"]) == 2
    r = run([sys.executable, "evaluation/serve", evaldir, "--profile", "demo"], tmp_path / "machine-4")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "SQLite" in r.stderr, r.stderr

    # no secret anywhere: outputs, the bucket's objects, the local files
    assert S3_SECRET not in first_out + first_err + "".join(OUTPUTS)
    for f in storage.resolve(bucket).files():
        assert S3_SECRET.encode() not in f.read_bytes(), f
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert S3_SECRET.encode() not in f.read_bytes(), f


def test_an_older_writer_stops_when_a_newer_run_takes_the_lease(bucket):
    from shards.errors import SigmaError

    loc = storage.resolve(f"{bucket}/runs/x")
    old = runfolder.RunFolder(loc)
    old.check_owner()
    new = runfolder.RunFolder(loc)  # a resume elsewhere while the old one still runs
    new.check_owner()
    with pytest.raises(SigmaError, match="another run took this run folder over"):
        old.check_owner()
    old.close()
    new.close()
