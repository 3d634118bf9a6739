"""training/evaluate's command line and model: --help reads as written, the run's run.json picks the model."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from training import checkpoint, evaluate
from training.model import DiT_models

ROOT = Path(__file__).resolve().parents[2]


def test_help_prints_percent_once_and_documents_device():
    r = subprocess.run([sys.executable, str(ROOT / "training" / "evaluate"), "--help"], capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and "95% bootstrap" in r.stdout and "95%%" not in r.stdout
    options = r.stdout[r.stdout.index("options:"):]
    device = options[options.index("--device"):].split("--port")[0]
    assert "torch device" in device


def test_the_model_comes_from_the_runs_run_json(tmp_path, demo_cfg):
    run = tmp_path / "exp"  # not a stage name: only run.json knows the model
    model = {"size": "tiny", "input_size": 32, "pe_interpolation": 0.5, "multi_scale": False}
    step = checkpoint.step_dir(run, 1)
    step.mkdir(parents=True)
    save_file(DiT_models["tiny"](**{k: v for k, v in model.items() if k != "size"}).state_dict(),
              str(step / checkpoint.MODEL))
    (run / "run.json").write_text(json.dumps({"model": model}))
    [resolved] = evaluate.resolve_runs([str(run)], demo_cfg.training.stages)
    built = evaluate.load_run_model(resolved, "XL/2", demo_cfg.training.stages, (256, 256))  # models.dit ignored
    assert built.hidden_size == 64 and built.pe_interpolation == 0.5 and built.input_size == 32
    assert not built.multi_scale and isinstance(built, torch.nn.Module)
