"""Two processes under torchrun (gloo, CPU) equal one process with the same global batch.

The same global batch: 2 processes x batch 2 x accum 1 against 1 process x batch 2 x accum 2
(the trainer's data and noise of a step depend only on world_size x grad_accum, not on how it is
split; see training/finetune.py).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tests.training import encdata
from training import checkpoint, finetune

ROOT = Path(__file__).resolve().parents[2]
STEPS = 3


def _losses(log: Path) -> list[float]:
    return [float(x) for x in re.findall(r"step \d+/\d+ loss ([\d.]+)", log.read_text())]


def test_two_process_ddp_equals_one_process(tmp_path, capsys):
    enc = encdata.write(tmp_path / "enc", "512", {(64, 64): 6, (48, 80): 6})
    common = ["--set", "training.stages.512.parent=null", "--set", f"training.checkpoint_every={STEPS}"]
    one = tmp_path / "one"
    finetune.main(encdata.args("512", enc, one, *common, "--set", "training.stages.512.grad_accum=2", steps=STEPS))
    capsys.readouterr()

    two = tmp_path / "two"
    r = encdata.torchrun(encdata.args("512", enc, two, *common, steps=STEPS))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es) x batch 2 x accum 1 = 4 per step" in r.stdout
    assert r.stdout.count("saved ") == 1  # only rank 0 writes

    a, b = _losses(one / "512" / "log.txt"), _losses(two / "512" / "log.txt")
    assert len(a) == len(b) == STEPS
    assert b == pytest.approx(a, rel=1e-4)
    wa = checkpoint.load_weights(one / "512" / "checkpoints" / f"step-{STEPS:07d}" / "model.safetensors")
    wb = checkpoint.load_weights(two / "512" / "checkpoints" / f"step-{STEPS:07d}" / "model.safetensors")
    assert wa["final_layer.linear.weight"].abs().sum() > 0  # zero-initialised: training moved it
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)
    state = checkpoint.load_state(checkpoint.latest(two / "512"))
    assert state["layout"] == [2, 1] and len(state["rng"]) == 2
