"""Checkpoints: complete-or-absent folders, keep last K, weights_only trainer state, what sampling picks."""

from __future__ import annotations

import random

import pytest
import torch

from training import checkpoint, runs


def _sd(v: float) -> dict:
    return {"a.weight": torch.full((3, 2), v), "b.bias": torch.arange(4.0) + v}


def test_save_keeps_the_last_k_and_round_trips(tmp_path):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], lr=1e-3)
    opt.param_groups[0]["params"][0].grad = torch.ones(2)
    opt.step()
    for step in (2, 4, 6):
        checkpoint.save(
            tmp_path,
            step,
            _sd(step),
            _sd(-step),
            {"optimizer": opt.state_dict(), "rng": [checkpoint.rng_state()], "data_epoch": step},
            keep=2,
        )
    assert checkpoint.list_steps(tmp_path) == [4, 6]
    last = checkpoint.latest(tmp_path)
    assert last.name == "step-0000006"
    assert torch.equal(checkpoint.load_weights(last / "model.safetensors")["a.weight"], torch.full((3, 2), 6.0))
    state = checkpoint.load_state(last)  # torch.load(weights_only=True): no arbitrary unpickling
    assert state["step"] == 6 and state["data_epoch"] == 6
    fresh = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], lr=1e-3)
    fresh.load_state_dict(state["optimizer"])
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    # sampling and export pick the newest EMA weights of the run
    assert runs.find_run_checkpoint(tmp_path) == last / "ema.safetensors"


def test_rng_states_restore_exactly(tmp_path):
    checkpoint.save(tmp_path, 1, _sd(1), None, {"rng": [checkpoint.rng_state()]}, keep=1)
    expected = (random.random(), torch.rand(3), __import__("numpy").random.rand())
    checkpoint.set_rng_state(checkpoint.load_state(checkpoint.latest(tmp_path))["rng"][0])
    again = (random.random(), torch.rand(3), __import__("numpy").random.rand())
    assert expected[0] == again[0] and torch.equal(expected[1], again[1]) and expected[2] == again[2]


def test_a_half_written_checkpoint_is_never_picked(tmp_path):
    checkpoint.save(tmp_path, 2, _sd(2), None, {}, keep=2)
    partial = checkpoint.folder(tmp_path) / checkpoint.PARTIAL  # what kill -9 during save leaves
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\x00" * 10)
    assert checkpoint.latest(tmp_path).name == "step-0000002"
    assert runs.find_run_checkpoint(tmp_path).parent.name == "step-0000002"
    assert checkpoint.clean_partial(tmp_path) and not partial.exists()
    # a failing write (here: a tensor safetensors refuses) leaves the previous checkpoint as it was
    with pytest.raises(Exception):  # noqa: B017 - safetensors raises its own types across versions; any will do
        checkpoint.save(tmp_path, 4, {"x": object()}, None, {}, keep=1)
    assert checkpoint.list_steps(tmp_path) == [2]


def test_a_checkpoint_on_a_store_is_committed_by_its_marker(bucket):
    from shards import storage

    run = storage.resolve(f"{bucket}/run")
    for step in (2, 4, 6):
        checkpoint.save(run, step, _sd(step), _sd(-step), {"rng": [checkpoint.rng_state()]}, keep=2)
    assert checkpoint.list_steps(run) == [4, 6]
    last = checkpoint.latest(run)
    assert last == run / "checkpoints" / "step-0000006" and (last / storage.MARKER).has_file()
    assert not (run / "checkpoints" / "step-0000002").iterdir()  # pruned whole
    assert torch.equal(checkpoint.load_weights(last / "model.safetensors")["a.weight"], torch.full((3, 2), 6.0))
    assert checkpoint.load_state(last)["step"] == 6
    assert runs.find_run_checkpoint(run) == last / "ema.safetensors"
    # files without their marker: a killed upload, newer than the rest, never chosen, removed by clean_partial
    (run / "checkpoints" / "step-0000008" / "model.safetensors").write_object(b"\0" * 10)
    assert checkpoint.latest(run) == last and checkpoint.load_resumable(run, ema=True)[0] == last
    assert checkpoint.clean_partial(run) and not (run / "checkpoints" / "step-0000008").iterdir()
    # a marker removed first (as pruning does): that checkpoint no longer counts
    (last / storage.MARKER).unlink()
    assert checkpoint.list_steps(run) == [4]
