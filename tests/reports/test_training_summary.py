"""The training summary page, rendered in headless Chromium from TensorBoard events and text logs."""

from __future__ import annotations

import pytest

from shards.errors import SigmaError

STAGES = (
    "Object.fromEntries([...document.querySelectorAll('table[data-table=stages] tr')].slice(1)"
    ".map(r => [r.cells[0].textContent, [...r.cells].slice(1).map(c => c.textContent)]))"
)
GRIDS = (
    "Object.fromEntries([...document.querySelectorAll('section.grid')].map(s => [s.dataset.stage, "
    "[s.dataset.step || null, s.querySelector('img') ? s.querySelector('img').naturalWidth : 0]]))"
)


def test_summary_of_all_stages_renders_in_chromium(training_runs, browser, tmp_path):
    from training.summary import write_summary

    out = write_summary(training_runs)
    assert out == training_runs / "summary.html"
    page = browser(out)
    assert page.errors == []
    assert page.broken_images() == 0
    plots = page.evaluate(
        "[...document.querySelectorAll('figure.plot')].map(f => [f.dataset.plot, f.querySelector('img').naturalWidth])"
    )
    assert [p[0] for p in plots] == [
        "train-loss",
        "train-lr",
        "train-grad_norm",
        "perf-samples_per_s",
        "perf-step_time_s",
    ]
    assert all(w > 200 for _, w in plots)
    stages = page.evaluate(STAGES)
    assert list(stages) == ["256", "512", "1k"]  # chain order from run.json; no run.json last
    assert stages["256"] == ["300", f"{1 / 300:.6g}", f"{1 / 300:.6g}", "40.0"]  # from TensorBoard events
    assert stages["512"] == ["20", "0.125", "0.125", "13.0"]  # from log.txt
    assert stages["1k"] == ["5", "0.5", "0.5", "2.0"]
    assert page.evaluate(GRIDS) == {"256": ["300", 160], "512": ["20", 96], "1k": [None, 0]}  # latest grid each
    shot = page.screenshot(tmp_path / "summary.png")
    assert shot.stat().st_size > 20_000


def test_summary_of_one_stage(training_runs, browser):
    from training.summary import write_summary

    page = browser(write_summary(training_runs / "512"))
    assert page.errors == []
    assert list(page.evaluate(STAGES)) == ["512"]
    assert page.evaluate(GRIDS) == {"512": ["20", 96]}


def test_summary_needs_a_run(tmp_path):
    from training.summary import write_summary

    with pytest.raises(SigmaError, match="no training run"):
        write_summary(tmp_path)
