"""Caption sets: side files beside the tars, old folders read as recaption + original, the draw rules."""

from __future__ import annotations

import hashlib
import itertools
import math
import random
from collections import Counter

import pytest
import torch

from shards import encoded, loader
from shards.errors import SigmaError
from tests.shards.synthetic import write_encdir

BUCKETS = {(64, 64): 14, (32, 64): 10}
SETS = {  # i -> (T5 length, CLIP-Score) or None: no caption in that set
    "recaption": lambda i: (4 + i % 3, 30.0),
    "qwen": lambda i: (6, 20.0 + i % 2),
    "short": lambda i: None if i % 4 == 0 else (2, 10.0),
}


@pytest.fixture(scope="module")
def sets_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    return root, write_encdir(root, BUCKETS, sets=SETS)


def rule(**weights):
    return loader.caption_rule(weights)


def batches(root, n=None, **kw):
    kw = {"batch_size": 2, "num_workers": 0, "resample": False, "keep_partial": True, "shuffle_buffer": 4, **kw}
    dl = loader.make_loader(root, **kw)
    return list(dl) if n is None else list(itertools.islice(iter(dl), n))


def test_side_files_beside_each_tar(sets_dir):
    root, truth = sets_dir
    tars = encoded.committed_shards(root)
    assert len(tars) > 2
    for tar in tars:
        assert sorted(encoded.set_files(tar)) == ["qwen", "recaption", "short"]
        rows = list(encoded.read_set(encoded.set_file(tar, "short")))
        tar_keys = [r["key"] for r in encoded.read_set(encoded.set_file(tar, "qwen"), ["key"])]
        assert [r["key"] for r in rows] == tar_keys  # one row per sample, in the tar's order
        for r in rows:
            assert (r["t5"] is None) == (truth[r["key"]]["i"] % 4 == 0)
    index = encoded.committed_rows(root, ["short", "qwen"])
    assert (index["t5_len_qwen"] == 6).all() and (index["t5_len_short"] == 0).sum() == 6
    assert index["clip_short"].isna().sum() == 6 and (index["clip_qwen"] >= 20).all()


def test_each_set_reads_its_own_features(sets_dir):
    root, truth = sets_dir
    for name, j in (("recaption", 0), ("qwen", 1), ("short", 2)):
        for b in batches(root, rule=rule(**{name: 1.0})):
            for row, key in enumerate(b["keys"]):
                i = truth[key]["i"]
                assert b["caption_source"][row] == name and b["caption"][row] == f"{name} {i}"
                n = int(b["mask"][row].sum())
                assert n == SETS[name](i)[0] and (b["y"][row, :n] == i + 1000 * j).all()
    assert sum(len(b["keys"]) for b in batches(root, rule=rule(short=1.0))) == 18  # 6 have no short caption


def test_old_folder_reads_as_recaption_and_original(tmp_path):
    truth = write_encdir(tmp_path, {(64, 64): 6})
    assert encoded.read_info(tmp_path)["format_version"] == 1
    assert encoded.caption_sets(encoded.read_info(tmp_path)) == {
        "recaption": {"stored": "inline"},
        "original": {"stored": "inline"},
    }
    seen = Counter()
    for b in batches(tmp_path, rule=rule(original=1.0, recaption=1.0), seed=1):
        for row, key in enumerate(b["keys"]):
            src, i = b["caption_source"][row], truth[key]["i"]
            seen[src] += 1
            assert b["caption"][row] == (f"orig {i}" if src == "original" else f"re {i}")
            if i % 2:
                assert src == "recaption"  # no original: renormalised away


def test_set_added_to_an_old_folder_leaves_the_tars_alone(tmp_path):
    truth = write_encdir(tmp_path, {(64, 64): 6, (32, 64): 4})
    tars = [t.local for t in encoded.committed_shards(tmp_path)]  # Locs: here on disk
    before = {
        str(p.relative_to(tmp_path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in tmp_path.rglob("*")
        if p.is_file()
    }
    for tar in tars:
        keys = [
            r["key"]
            for r in encoded.committed_rows(tmp_path).to_dict("records")
            if r["shard"] == str(tar.relative_to(tmp_path))
        ]
        encoded.write_set(tar, "qwen", [(k, f"q {k}", torch.full((3, 8), 7.0), 25.0) for k in keys])
    after = {
        str(p.relative_to(tmp_path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in tmp_path.rglob("*")
        if p.is_file()
    }
    assert {k: after[k] for k in before} == before and len(after) == len(before) + len(tars)
    got = [(key, b["caption"][r]) for b in batches(tmp_path, rule=rule(qwen=1.0)) for r, key in enumerate(b["keys"])]
    assert sorted(got) == sorted((k, f"q {k}") for k in truth)
    sources = Counter(s for b in batches(tmp_path, rule=rule(qwen=1.0, recaption=1.0)) for s in b["caption_source"])
    assert set(sources) == {"qwen", "recaption"}


def test_real_prompt_ratio_is_a_case_of_fixed_weights(tmp_path):
    write_encdir(tmp_path, {(64, 64): 10, (32, 64): 6})
    for r in (0.3, 0.5):
        a = batches(tmp_path, 20, resample=True, real_prompt_ratio=r, seed=4)
        b = batches(tmp_path, 20, resample=True, seed=4, rule=loader.caption_rule({"original": r, "recaption": 1 - r}))
        assert [x["caption_source"] for x in a] == [x["caption_source"] for x in b]
        assert all(torch.equal(x["y"], y["y"]) for x, y in zip(a, b))


def test_fixed_weights_frequencies_within_sampling_error():
    weights = {"original": 0.05, "share": 0.6, "qwen": 0.35}
    rng, n = random.Random(0), 100_000
    counts = Counter(loader.choose_weighted(list(weights), weights, rng) for _ in range(n))
    for name, w in weights.items():
        assert abs(counts[name] / n - w) < 4 * math.sqrt(w * (1 - w) / n)
    # a sample without `share`: renormalised over the two others
    counts = Counter(loader.choose_weighted(["original", "qwen"], weights, rng) for _ in range(n))
    p = 0.05 / 0.40
    assert abs(counts["original"] / n - p) < 4 * math.sqrt(p * (1 - p) / n)
    # weight 0: only for a sample that has nothing else
    assert loader.choose_weighted(["original"], {"original": 0.0, "share": 1.0}, rng) == "original"
    assert Counter(
        loader.choose_weighted(["original", "share"], {"original": 0.0, "share": 1.0}, rng) for _ in range(50)
    ) == {"share": 50}


def sana(scores: dict[str, float], thr: float, temperature: float, rng: random.Random) -> str:
    """Sana's weighted_sample_clipscore, transcribed (its loops over suffix files folded into one dict)."""
    labels, weights, fallback, best = [], [], None, float("-inf")
    for caption_type, score in scores.items():
        if score >= thr:
            labels.append(caption_type)
            weights.append(score)
        if score > best:
            best, fallback = score, caption_type
    if not labels:
        return fallback
    adjusted = [w ** (1.0 / max(temperature, 0.01)) for w in weights]
    return rng.choices(labels, weights=[a / sum(adjusted) for a in adjusted], k=1)[0]


def test_clip_score_rule_matches_sana_on_a_hand_checked_example():
    scores = {"share": 30.0, "qwen": 20.0, "original": 10.0}
    # threshold 15, T = 0.5: candidates share and qwen, weights 30^2 = 900 and 20^2 = 400 -> 9/13 and 4/13
    a, b, n = random.Random(7), random.Random(7), 100_000
    ours = [loader.choose_clip(scores, 15.0, 0.5, a) for _ in range(n)]
    assert ours == [sana(scores, 15.0, 0.5, b) for _ in range(n)]  # the same draws from the same stream
    counts = Counter(ours)
    assert counts["original"] == 0 and abs(counts["share"] / n - 9 / 13) < 4 * math.sqrt((9 / 13) * (4 / 13) / n)
    assert loader.choose_clip(scores, 40.0, 1.0, a) == "share"  # none reaches 40: the best-scoring caption
    assert loader.choose_clip({"x": 12.0, "y": 12.0}, 40.0, 1.0, a) == "x"  # ties: the first, as Sana
    assert loader.choose_clip(scores, 25.0, 1.0, a) == "share"  # one candidate: no draw


def test_clip_score_rule_in_the_loader(sets_dir):
    root, truth = sets_dir
    r = loader.caption_rule({"recaption": 1.0, "qwen": 1.0, "short": 1.0}, clip_score=True, threshold=15.0)
    counts = Counter(s for b in batches(root, rule=r) for s in b["caption_source"])
    assert counts["short"] == 0 and counts["recaption"] > counts["qwen"] > 0  # 30 vs ~20: 0.6 vs 0.4


def test_draws_reproduce_for_the_same_stream(sets_dir):
    root, _ = sets_dir
    r = rule(recaption=0.2, qwen=0.5, short=0.3)
    kw = dict(resample=True, num_workers=2, seed=3, shuffle_buffer=8, rule=r)
    a, b = batches(root, 30, **kw), batches(root, 30, **kw)
    assert [x["caption_source"] for x in a] == [x["caption_source"] for x in b]
    assert [x["keys"] for x in a] == [x["keys"] for x in b]
    c = batches(root, 30, **{**kw, "seed": 4})
    assert [x["caption_source"] for x in a] != [x["caption_source"] for x in c]


def test_bad_input_is_one_line(sets_dir, tmp_path):
    root, _ = sets_dir
    cases = [
        (lambda: loader.caption_rule({"a": 0.0, "b": 0.0}), "do not sum to a positive number"),
        (lambda: loader.caption_rule({"a": -1.0, "b": 2.0}), "a weight is a number >= 0"),
        (lambda: loader.caption_rule({"a": 1.0}, clip_score=True, temperature=0.0), "temperature must be > 0"),
        (lambda: loader.caption_rule({"Bad-Name": 1.0}), r"\[a-z0-9_\]\+"),
        (lambda: loader.make_loader(root, batch_size=2, rule=rule(qwen=1.0, llava=1.0)), "'llava' is not in"),
        (lambda: loader.make_loader(root, batch_size=2, rule=rule(short=1.0, original=0.5)), "'original' is not in"),
    ]
    for make, message in cases:
        with pytest.raises(SigmaError, match=message) as e:
            make()
        assert "\n" not in str(e.value)
    sparse = tmp_path / "sparse"
    write_encdir(
        sparse, {(64, 64): 8}, sets={"recaption": lambda i: (3, None), "rare": lambda i: (2, None) if i < 3 else None}
    )
    with pytest.raises(SigmaError, match="'rare' is missing for 5 of 8 samples"):
        loader.make_loader(sparse, batch_size=2, rule=rule(recaption=0.5, rare=0.5))
    with pytest.raises(SigmaError, match="no caption of .* has a CLIP-Score"):
        loader.make_loader(
            sparse, batch_size=2, rule=loader.caption_rule({"recaption": 1.0, "rare": 0.0}, clip_score=True)
        )


def test_the_same_tar_drawn_twice_in_a_row_reads_its_sets_again(tmp_path):
    write_encdir(tmp_path, {(64, 64): 3}, shard_bytes=10**9, sets={"qwen": lambda i: (2, None)})
    assert len(encoded.committed_shards(tmp_path)) == 1  # every draw is the same tar
    got = batches(tmp_path, 12, resample=True, rule=rule(qwen=1.0))
    assert len(got) == 12 and all(src == "qwen" for b in got for src in b["caption_source"])
