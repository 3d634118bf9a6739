"""Fixtures for evaluation/: two tiny runs sampled into one evaluation folder (training/sample
--prompts), that folder scored (evaluation/evaluate), the Inception stand-in, a headless Chromium page."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.chromium import chromium

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["A red fox in the snow.", "A lighthouse on a cliff at sunset.", "A small cactus with a happy face."]
SEEDS = "0,1"
SIZE = "64x64"
STEPS = "2"


def command(path: str, *args, timeout=240):
    """A real entry point, as the README runs it (demo profile: the tiny offline models)."""
    cmd = [sys.executable, str(ROOT / path), "--profile", "demo", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def evaluate(*args, timeout=240):
    return command("evaluation/evaluate", *args, timeout=timeout)


def sample_batch(source: list, prompts_file, out, *args):
    """training/sample's batch mode: one run's images into an evaluation folder."""
    r = command(
        "training/sample",
        *source,
        "--prompts",
        prompts_file,
        "--out",
        out,
        "--size",
        SIZE,
        "--seeds",
        SEEDS,
        "--steps",
        STEPS,
        "--device",
        "cpu",
        *args,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """Two 'runs' with different random weights: a run folder in training/finetune's layout (the
    newest step's EMA weights are read; its name is a stage) and a bare checkpoint file."""
    from training import checkpoint
    from training.model import DiT_models

    root = tmp_path_factory.mktemp("runs")
    step = lambda n: checkpoint.step_dir(root / "512", n)
    files = [
        step(5) / checkpoint.EMA,
        step(10) / checkpoint.MODEL,
        step(10) / checkpoint.EMA,
        root / "tuned.safetensors",
    ]
    for seed, path in enumerate(files):
        torch.manual_seed(seed)
        model = DiT_models["tiny"]()
        for p in model.parameters():  # the zero-initialised output layers would make every image alike
            torch.nn.init.normal_(p, std=0.05)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(model.state_dict(), str(path))
    return [root / "512", files[-1]]


@pytest.fixture(scope="session")
def prompts():
    return list(PROMPTS)


@pytest.fixture(scope="session")
def evaluate_cli():
    return evaluate


@pytest.fixture(scope="session")
def command_cli():
    return command


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path


@pytest.fixture(scope="session")
def evaldir(tmp_path_factory, tiny_models, runs, prompts_file):
    """One evaluation of both runs, shared by the tests that read its output: each run sampled by
    training/sample --prompts, then evaluation/evaluate over the folder."""
    out = tmp_path_factory.mktemp("eval")
    sample_batch(["--run", runs[0]], prompts_file, out / "images" / "512")
    sample_batch(["--ckpt", runs[1]], prompts_file, out / "images" / "tuned")
    r = evaluate(out, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def inception(tmp_path_factory):
    """A random-weight InceptionV3 in torch-fidelity's file format (~96 MB; its FIDs mean nothing)."""
    from evaluation import fid

    return fid.write_standin(tmp_path_factory.mktemp("inception") / "weights-inception-standin.pth")


# ---------------------------------------------------------------------------------------------
# Headless Chromium, driven over the DevTools protocol (tests/chromium.py)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def browser(tmp_path):
    """A blank page of a headless Chromium of its own."""
    with chromium(tmp_path / "chromium-profile") as new_page:
        yield new_page()
