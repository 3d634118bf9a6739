"""training/finetune end to end on tiny encoded data: every stage chained, resume after kill -9, NaN stop, logs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.terminal import RATE_AND_ETA, on_terminal
from tests.training import encdata
from training import checkpoint, finetune, sample, summary

ROOT = Path(__file__).resolve().parents[2]
CHAIN = ["256", "vae", "512", "1k", "2k", "4k", "kv"]
TIER = {"256": "256", "vae": "256", "512": "512", "1k": "1k", "2k": "2k", "4k": "4k", "kv": "4k"}


@pytest.fixture(scope="module")
def enc(tmp_path_factory):
    return encdata.write_all(tmp_path_factory.mktemp("enc"))


def losses(log: Path) -> dict[int, float]:
    return {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"step (\d+)/\d+ loss ([\d.]+)", log.read_text())}


def test_every_stage_chains_from_its_parent(enc, tmp_path, tiny_models, capsys):
    runs = tmp_path / "runs"
    for stage in CHAIN:
        finetune.main(
            encdata.args(stage, enc[TIER[stage]], runs, "--set", "training.checkpoint_every=1", steps=1, batch=1)
        )
        out = capsys.readouterr().out
        assert checkpoint.list_steps(runs / stage) == [1], stage
        if stage != "256":
            parent = CHAIN[CHAIN.index(stage) - 1]
            assert f"initialised from {runs / parent}/checkpoints/step-0000001/model.safetensors" in out, out
    assert "4 KV-compression tensors at their average init" in out  # demo kv stage: layer 1 (sr + norm)
    kv = checkpoint.load_weights(runs / "kv" / "checkpoints" / "step-0000001" / "model.safetensors")
    four = checkpoint.load_weights(runs / "4k" / "checkpoints" / "step-0000001" / "model.safetensors")
    assert set(kv) - set(four) == {f"blocks.1.attn.{m}.{p}" for m in ("sr", "norm") for p in ("weight", "bias")}
    # rerunning a finished stage resumes and does nothing
    finetune.main(encdata.args("512", enc["512"], runs, steps=1, batch=1))
    out = capsys.readouterr().out
    assert "resuming from step 1" in out and "nothing to do" in out


def test_logs_tensorboard_and_sample_grid(enc, tmp_path, tiny_models, capsys):
    runs = tmp_path / "runs"
    with on_terminal() as tty:  # as in a user's shell: a progress bar with rate, ETA and the loss
        finetune.main(
            encdata.args(
                "512",
                enc["512"],
                runs,
                "--set",
                "training.stages.512.parent=null",
                "--set",
                "training.sample_every=2",
                "--set",
                "training.sample_steps=2",
                "--set",
                "training.sample_prompts=[a red fox, a small house]",
                steps=2,
            )
        )
    assert "train 512: 100%" in tty.text and "2/2" in tty.text and "loss=" in tty.text, tty.text
    assert re.search(RATE_AND_ETA.format(unit="step"), tty.text), tty.text
    rundir = runs / "512"
    lines = [line for line in (rundir / "log.txt").read_text().splitlines() if line.startswith("step ")]
    assert len(lines) == 2 and all(k in lines[-1] for k in ("loss", "lr", "grad_norm", "samples/s", "step_time"))
    assert re.search(r" captions/recaption (0|1)\.\d{3}", lines[-1]), lines[-1]  # per-set draw shares
    assert list((rundir / "tb").glob("events.out.tfevents.*"))
    from PIL import Image

    grid = Image.open(rundir / "samples" / "step-0000002.png").convert("L")
    assert grid.size == (2 * 512, 512 + sample.CAPTION_H)  # two prompts side by side, each captioned below
    for left in (0, 512):  # dark text on the white strip under each image
        strip = grid.crop((left, 512, left + 512, 512 + sample.CAPTION_H))
        assert min(strip.getdata()) < 100 and max(strip.getdata()) == 255
    assert sorted(p.name for p in (rundir / "checkpoints" / "step-0000002").iterdir()) == [
        "ema.safetensors",
        "model.safetensors",
        "trainer.pt",
    ]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(rundir / "tb")).Reload()
    assert "train/loss" in events.Tags()["scalars"] and "samples/512" in events.Tags()["images"]
    assert "captions/recaption" in events.Tags()["scalars"]
    page = (rundir / "summary.html").read_text()
    assert "<img" in page and "loss" in page
    # rerunning the finished stage keeps the checkpoint step's scalars and grid (purge_step = step + 1)
    finetune.main(
        encdata.args(
            "512",
            enc["512"],
            runs,
            "--set",
            "training.stages.512.parent=null",
            "--set",
            "training.sample_every=2",
            "--set",
            "training.sample_steps=2",
            "--set",
            "training.sample_prompts=[a red fox, a small house]",
            steps=2,
        )
    )
    events = EventAccumulator(str(rundir / "tb")).Reload()
    assert [e.step for e in events.Scalars("train/loss")][-1] == 2
    assert [e.step for e in events.Images("samples/512")] == [2]
    assert max(s for s, _ in summary.read_scalars(rundir)["train/loss"]) == 2  # summary.html's last step


def _cmd(enc, runs, steps):
    return [
        sys.executable,
        "training/finetune",
        *encdata.args(
            "512",
            enc["512"],
            runs,
            "--set",
            "training.stages.512.parent=null",
            "--set",
            "training.checkpoint_every=2",
            steps=steps,
        ),
    ]


def test_resume_after_kill_9_continues_the_same_loss_curve(enc, tmp_path, capsys):
    steps = 8
    ref = tmp_path / "ref"
    finetune.main(
        encdata.args(
            "512",
            enc["512"],
            ref,
            "--set",
            "training.stages.512.parent=null",
            "--set",
            "training.checkpoint_every=2",
            steps=steps,
        )
    )
    capsys.readouterr()
    runs = tmp_path / "runs"
    proc = subprocess.Popen(_cmd(enc, runs, steps), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not checkpoint.list_steps(runs / "512") and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = checkpoint.list_steps(runs / "512")[-1]
    r = subprocess.run(_cmd(enc, runs, steps), cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"resuming from step {killed_at}" in r.stdout
    assert "train 512:" not in r.stderr and "it/s" not in r.stderr  # no progress bar in a log
    a, b = losses(ref / "512" / "log.txt"), losses(runs / "512" / "log.txt")
    assert set(range(killed_at + 1, steps + 1)) <= set(b)
    for s in range(killed_at + 1, steps + 1):
        assert b[s] == pytest.approx(a[s], rel=1e-5, abs=1e-6), s
    wa = checkpoint.load_weights(ref / "512" / "checkpoints" / f"step-{steps:07d}" / "model.safetensors")
    wb = checkpoint.load_weights(runs / "512" / "checkpoints" / f"step-{steps:07d}" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)
    assert checkpoint.list_steps(runs / "512") == [steps - 2, steps]  # keep_checkpoints: 2


def test_nan_loss_stops_with_step_and_keys_and_saves_nothing(tmp_path, capsys):
    data = encdata.write(tmp_path / "enc", "512", {(64, 64): 1}, nan_key="512-00000")  # in every batch
    runs = tmp_path / "runs"
    with pytest.raises(SystemExit) as e:
        finetune.main(
            encdata.args(
                "512",
                data,
                runs,
                "--set",
                "training.stages.512.parent=null",
                "--set",
                "training.checkpoint_every=1",
                steps=3,
            )
        )
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "step 1: non-finite loss nan" in err and "512-00000" in err and "last checkpoint: none" in err
    assert checkpoint.list_steps(runs / "512") == []


def _512(enc, runs, *extra, steps):
    return encdata.args(
        "512",
        enc["512"],
        runs,
        "--set",
        "training.stages.512.parent=null",
        "--set",
        "training.checkpoint_every=2",
        *extra,
        steps=steps,
    )


def test_unreadable_newest_checkpoint_falls_back_to_the_previous_one(enc, tmp_path, capsys):
    runs = tmp_path / "runs"
    finetune.main(_512(enc, runs, steps=4))
    newest = checkpoint.step_dir(runs / "512", 4) / checkpoint.MODEL
    newest.write_bytes(newest.read_bytes()[:-64])  # truncated, as by a full disk outside our writer
    capsys.readouterr()
    finetune.main(_512(enc, runs, steps=6))
    out = capsys.readouterr().out
    assert "checkpoint step 4 is unreadable" in out and str(newest) in out and "falling back" in out
    assert "resuming from step 2" in out
    assert checkpoint.list_steps(runs / "512") == [4, 6]
    checkpoint.load_weights(checkpoint.step_dir(runs / "512", 4) / checkpoint.MODEL)  # rewritten whole


def test_a_resume_with_other_settings_is_refused_naming_them(enc, tmp_path, capsys):
    runs = tmp_path / "runs"
    finetune.main(_512(enc, runs, steps=2))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        finetune.main(_512(enc, runs, "--set", "training.stages.512.lr=0.5", steps=4))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "training.stages.512.lr" in err and "fingerprint.json" in err
    assert checkpoint.list_steps(runs / "512") == [2]
    finetune.main(_512(enc, runs, steps=4))  # more steps with the same settings: a normal resume
    assert checkpoint.list_steps(runs / "512") == [2, 4]


def test_dry_run_says_where_a_stage_starts_and_warns_on_another_position_setup(enc, tmp_path, capsys):
    from training.model import DiT_models

    released = tmp_path / "PixArt-Sigma-XL-2-1024-MS.pth"
    torch.save(DiT_models["tiny"]().state_dict(), released)
    finetune.main(encdata.args("512", enc["512"], tmp_path / "runs", "--init", str(released), "--dry-run"))
    captured = capsys.readouterr()
    plan = json.loads(captured.out)
    assert plan["init"] == str(released) and plan["resolution"] == 512
    assert plan["init_trained_at"] == "1024 px, pe_interpolation 2.0"
    assert "warning:" in captured.err and "--stage 1k" in captured.err
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_log_txt_lines_are_written_and_read_by_one_format():
    values = {
        "train/loss": 0.125,
        "train/lr": 1e-4,
        "train/grad_norm": 0.5,
        "perf/samples_per_s": 12.5,
        "perf/step_time_s": 0.25,
    }
    line = summary.log_line(20, 100, values)
    assert line == "step 20/100 loss 0.125000 lr 1.000e-04 grad_norm 0.5000 samples/s 12.5 step_time 0.250s"
    assert summary.parse_log_line(line) == (20, values)
    assert summary.parse_log_line("saved runs/512/checkpoints/step-0000020") is None


def test_a_sample_grid_model_off_the_hub_is_one_line_before_anything_starts(enc, tmp_path, capsys, monkeypatch):
    import shutil

    from huggingface_hub import constants

    data = tmp_path / "enc"
    shutil.copytree(enc["512"], data)
    info = json.loads((data / "info.json").read_text())
    info["t5"], info["t5_revision"] = "google/t5-v1_1-xxl", None  # the data was encoded with a hub T5
    (data / "info.json").write_text(json.dumps(info))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # not in the cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    runs = tmp_path / "runs"
    t0 = time.monotonic()
    with pytest.raises(SystemExit) as e:
        finetune.main(_512({"512": data}, runs, "--set", "training.sample_every=1", steps=1))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: models.t5: T5 encoder google/t5-v1_1-xxl: not in the local Hugging Face cache"), err
    assert time.monotonic() - t0 < 10 and not runs.exists()  # before the model, the data or the run folder
    finetune.main(_512({"512": data}, runs, steps=1))  # without sample grids no T5 is needed: trains as before
    assert checkpoint.list_steps(runs / "512") == [1]
