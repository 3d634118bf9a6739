"""training/sample --prompts + evaluation/evaluate: images with identical settings, CLIP and aesthetic
scores, bootstrap summary, errors."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from evaluation import evaluate, results, scores, stats
from shards import evalset


def test_evaluate_writes_images_sidecars_scores_and_summary(evaldir, runs, prompts):
    pngs = sorted(evaldir.glob("images/*/*.png"))
    assert [p.relative_to(evaldir / "images").as_posix() for p in pngs] == [
        f"{run}/{i}-{s}.png" for run in ("512", "tuned") for i in range(3) for s in (0, 1)
    ]
    meta = json.loads((evaldir / "images" / "512" / "1-1.json").read_text())
    assert {k: meta[k] for k in ("prompt", "run", "stage", "seed", "steps", "cfg", "size", "category")} == {
        "prompt": prompts[1],
        "run": "512",
        "stage": "512",
        "seed": 1,
        "steps": 2,
        "cfg": 4.5,
        "size": [64, 64],
        "category": None,
    }
    record = json.loads((evaldir / "images" / "512" / "generation.json").read_text())
    assert record["generator"] == "training/sample" and record["run"] == str(runs[0]) and record["seeds"] == [0, 1]
    assert record["models"]["t5"].endswith("t5") and record["sampler"].startswith("DPM-Solver++")
    assert record["checkpoint"] == meta["checkpoint"] and record["dit"] == "tiny" and record["prompts"] == 3
    assert meta["checkpoint"] == str(runs[0] / "checkpoints" / "step-0000010" / "ema.safetensors")  # newest, EMA
    assert json.loads((evaldir / "images" / "tuned" / "0-0.json").read_text())["stage"] is None  # a bare checkpoint
    pixels = {p: np.asarray(Image.open(p)) for p in pngs}
    assert all(a.shape == (64, 64, 3) for a in pixels.values())
    assert len({a.tobytes() for a in pixels.values()}) == 12  # no two images alike: runs, prompts, seeds all matter

    df = pd.read_parquet(evaldir / "scores.parquet")
    assert {"run", "prompt", "seed", "clip_score", "aesthetic"} <= set(df.columns) and len(df) == 12
    assert df.groupby("run").size().to_dict() == {"512": 6, "tuned": 6}
    assert np.isfinite(df[["clip_score", "aesthetic"]].to_numpy()).all()
    assert df.clip_score.between(-100, 100).all() and df.clip_score.nunique() > 1 and df.aesthetic.nunique() > 1

    summary = (evaldir / "summary.md").read_text()
    metrics = json.loads((evaldir / "metrics.json").read_text())
    assert metrics["runs"] == ["512", "tuned"] and metrics["categories"] == {} and metrics["reference"] is None
    assert metrics["overall"]["512"]["clip_score"]["mean"] == pytest.approx(df[df.run == "512"].clip_score.mean())
    for run, stage in (("512", "512"), ("tuned", "-")):
        row = next(line for line in summary.splitlines() if line.startswith(f"| {run} | {stage} | 6 |"))
        (clip, clo, chi), (aes, alo, ahi) = [
            tuple(map(float, m)) for m in re.findall(r"(-?[\d.]+) \[(-?[\d.]+), (-?[\d.]+)\]", row)
        ]
        d = df[df.run == run]
        assert clip == pytest.approx(d.clip_score.mean(), abs=1e-3) and clo <= clip <= chi
        assert aes == pytest.approx(d.aesthetic.mean(), abs=1e-3) and alo <= aes <= ahi
    assert "| tuned | 512 | 6 |" in summary  # the paired difference to the first run


def test_scores_are_the_curation_scorer_and_clip_similarity(evaldir, demo_cfg):
    """Scoring one image again through the Scorer (curation's CLIP and head) gives the table's values."""
    df = pd.read_parquet(evaldir / "scores.parquet")
    row = df.iloc[7]
    m = demo_cfg.models
    scorer = scores.Scorer(m.clip.arch, m.clip.weights, m.clip.config_dir, m.aesthetic_head)
    image = Image.open(evaldir / row.image).convert("RGB")
    again = scorer({"image": [image, image], "prompt": [row.prompt, "something else entirely"]})
    assert again["clip_score"][0] == pytest.approx(row.clip_score, abs=1e-4)
    assert again["aesthetic"][0] == pytest.approx(row.aesthetic, abs=1e-4) == again["aesthetic"][1]
    assert again["clip_score"][1] != pytest.approx(row.clip_score, abs=1e-4)  # the prompt matters


def test_same_seed_gives_the_same_initial_noise_in_every_run(tmp_path, tiny_models, demo_cfg, runs, prompts):
    """The DiT's first input for (prompt, seed) is the same in both runs; seeds differ from each other.
    A rerun skips finished images; changed settings redo them."""
    from training import runs as runs_mod
    from training.sample import Generator

    noises: dict[tuple, torch.Tensor] = {}
    items = [{"prompt": p, "category": None, "id": None} for p in prompts[:2]]
    gen = None
    for name, path in (("512", runs_mod.find_run_checkpoint(runs[0])), ("tuned", runs[1])):
        model = runs_mod.load_model(path, "tiny", input_size=8, pe_interpolation=1.0, multi_scale=True)
        gen = Generator(model, demo_cfg.models.t5, demo_cfg.models.vae) if gen is None else gen
        gen.use(model)
        calls = []
        model.register_forward_pre_hook(lambda mod, args: calls.append(args[0][:1].clone()))  # x [2N, C, h, w]
        make = lambda steps: lambda text, seed: gen([text], 64, 64, steps=steps, seed=seed)[0]
        settings = {"stage": None, "steps": 1, "cfg": 4.5, "size": [64, 64], "uncond": "official", "checkpoint": name}
        folder = tmp_path / "images" / name
        made = evalset.write_folder(make(1), folder, items, [0, 1], settings, {}, log=lambda s: None)
        assert made == 4 and len(calls) == 4  # one DPM-Solver step: one forward per image
        for (i, s), x in zip([(0, 0), (0, 1), (1, 0), (1, 1)], calls):
            noises[name, i, s] = x
        assert evalset.write_folder(make(1), folder, items, [0, 1], settings, {}, log=lambda s: None) == 0
        assert len(calls) == 4
    for i in range(2):
        for s in range(2):
            assert torch.equal(noises["512", i, s], noises["tuned", i, s])
    assert not torch.equal(noises["512", 0, 0], noises["512", 0, 1])
    changed = {**settings, "steps": 2}
    assert evalset.write_folder(make(2), folder, items, [0], changed, {}, log=lambda s: None) == 2


def test_bootstrap_interval_contains_the_mean_and_narrows():
    rng = np.random.default_rng(0)
    small, large = rng.normal(5, 1, 10), rng.normal(5, 1, 1000)
    for values in (small, large):
        lo, hi = stats.bootstrap_ci(values)
        assert lo < values.mean() < hi
    assert np.diff(stats.bootstrap_ci(large)) < np.diff(stats.bootstrap_ci(small)) / 5
    assert stats.bootstrap_ci([3.0, 3.0, 3.0]) == (3.0, 3.0)
    df = pd.DataFrame(
        {
            "run": ["a"] * 4 + ["b"] * 4,
            "stage": None,
            "prompt_idx": [0, 1, 2, 3] * 2,
            "seed": 0,
            "clip_score": [1.0, 2, 3, 4, 2, 3, 4, 5],
            "aesthetic": [5.0] * 8,
            "category": ["x", "x", "y", "y"] * 2,
        }
    )
    rows = evaluate.summarize(df, ["a", "b"])
    diff = next(r for r in rows if r["vs"] == "a" and r["score"] == "clip_score")
    assert diff["mean"] == 1.0 and diff["lo"] == diff["hi"] == 1.0  # paired: every prompt gained exactly 1
    metrics = results.collect(df, ["a", "b"])
    assert metrics["overall"]["a"]["clip_score"]["mean"] == 2.5
    assert metrics["categories"]["x"]["b"]["clip_score"]["mean"] == 2.5  # b's x prompts: 2, 3
    assert metrics["categories"]["y"]["a"]["clip_score"]["n"] == 2
    for r in rows + [v["clip_score"] for v in metrics["overall"].values()]:
        assert r["lo"] <= r["mean"] <= r["hi"]


@pytest.mark.parametrize(
    "content, suffix, message",
    [
        (None, ".txt", "prompt file not found"),
        ("\n  \n", ".txt", "no prompts in the file"),
        ('{"prompt": "a"}\n{"prompt": "b"\n', ".jsonl", "line 2: not valid JSON"),
        ('{"prompt": "a"}\n["b"]\n', ".jsonl", 'line 2: expected an object with a non-empty "prompt" string'),
        ("a\n", ".csv", "must be .txt, .jsonl or .json"),
        ('{"7": {"prompt": "a", "category": "x"}, "8": {"category": "y"}}', ".json", "id 8: expected an object"),
        ('["a"]', ".json", "MJHQ-30K meta_data.json"),
    ],
)
def test_bad_prompt_files_are_one_line_errors(tmp_path, capsys, runs, content, suffix, message):
    path = tmp_path / f"prompts{suffix}"
    if content is not None:
        path.write_text(content)
    from training import sample

    dry = ["--dry-run"] if content is not None else []  # a dry run only notes a file that is not there yet
    with pytest.raises(SystemExit) as e:
        sample.main(
            ["--profile", "demo", "--run", str(runs[0]), "--prompts", str(path), "--out", str(tmp_path / "out"), *dry]
        )
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_bad_folders_and_flags_are_one_line_errors(tmp_path, capsys, runs, prompts_file, evaluate_cli):
    from training import sample

    r = evaluate_cli(tmp_path / "nope")
    assert r.returncode == 2 and r.stderr.strip() == f"error: {tmp_path / 'nope'}: evaluation folder not found", (
        r.stderr
    )
    (tmp_path / "empty").mkdir()
    cases = [
        (evaluate.main, [str(tmp_path / "empty")], "no images under images/"),
        (evaluate.main, [str(tmp_path / "empty"), "--reference", str(tmp_path)], "--reference needs --inception"),
        (
            sample.main,
            ["--run", str(runs[0]), "--prompts", str(prompts_file), "--seeds", "0,x", "--out", str(tmp_path / "o")],
            "--seeds 0,x: expected distinct integers",
        ),
        (
            sample.main,
            ["--run", str(runs[0]), "--prompts", str(prompts_file), "--out", str(tmp_path / "o.png")],
            "with --prompts, --out is a folder",
        ),
    ]
    for main, args, message in cases:
        with pytest.raises(SystemExit) as e:
            main(["--profile", "demo", *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.png").exists()


def test_dry_runs_print_the_plan(tmp_path, capsys, runs, prompts_file, evaldir):
    from training import sample

    sample.main(
        [
            "--profile",
            "demo",
            "--run",
            str(runs[0]),
            "--prompts",
            str(prompts_file),
            "--out",
            str(tmp_path / "out"),
            "--size",
            "64x64",
            "--seeds",
            "3,4,5",
            "--dry-run",
        ]
    )
    plan = json.loads(capsys.readouterr().out)
    assert plan["prompts"] == 3 and plan["seeds"] == [3, 4, 5] and plan["checkpoint"].endswith("ema.safetensors")
    evaluate.main(["--profile", "demo", str(evaldir), "--dry-run"])
    plan = json.loads(capsys.readouterr().out)
    assert plan["models"] == {"512": 6, "tuned": 6} and plan["reference"] is None
    assert not (tmp_path / "out").exists()
