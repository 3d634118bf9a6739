"""The training loader on an ENCDIR written by the real writer: padding, captions, buckets, seeds, workers."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch

from shards import loader
from shards.errors import SigmaError
from tests.shards.synthetic import write_encdir

SCALE = 0.13025
BUCKETS = {(64, 64): 7, (32, 64): 5, (64, 32): 4}  # latent 8x8, 4x8, 8x4


@pytest.fixture(scope="module")
def encdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    return root, write_encdir(root, BUCKETS)


def one_pass(root, **kw):
    kw = {"batch_size": 2, "num_workers": 0, "resample": False, "keep_partial": True, "shuffle_buffer": 4, **kw}
    return list(loader.make_loader(root, **kw))


def test_batches_are_what_the_trainer_consumes(encdir):
    root, truth = encdir
    batches = one_pass(root, real_prompt_ratio=0.0, model_max_length=300)
    assert sum(len(b["keys"]) for b in batches) == len(truth)
    for b in batches:
        B = len(b["keys"])
        h, w = b["bucket_hw"]
        assert b["latent"].shape == (B, 4, h // 8, w // 8) and b["latent"].dtype == torch.float32
        assert b["y"].shape == (B, 300, 8) and b["mask"].shape == (B, 300) and b["mask"].dtype == torch.bool
        assert {truth[k]["hw"] for k in b["keys"]} == {(h, w)}  # one bucket per batch
        for row, key in enumerate(b["keys"]):
            i, n = truth[key]["i"], 3 + truth[key]["i"] % 5
            assert b["caption_source"][row] == "recaption" and b["caption"][row] == f"re {i}"
            assert b["mask"][row].sum() == n and b["mask"][row, :n].all()
            assert (b["y"][row, :n] == i).all() and (b["y"][row, n:] == 0).all()
            if truth[key]["std"] == 0:
                torch.testing.assert_close(b["latent"][row], torch.full_like(b["latent"][row], i * SCALE))


def test_real_prompt_ratio_picks_the_original_caption(encdir):
    root, truth = encdir
    for b in one_pass(root, real_prompt_ratio=1.0):
        for row, key in enumerate(b["keys"]):
            i = truth[key]["i"]
            if i % 2 == 0:  # has an original caption
                assert b["caption_source"][row] == "original" and b["mask"][row].sum() == 2
                assert (b["y"][row, :2] == -i).all()
            else:
                assert b["caption_source"][row] == "recaption"
    sources = Counter(s for b in one_pass(root, real_prompt_ratio=0.5, seed=3) for s in b["caption_source"])
    assert sources["original"] > 0 and sources["recaption"] > 0


def test_model_length_truncates_and_pads(encdir):
    root, _ = encdir
    b = one_pass(root, real_prompt_ratio=0.0, model_max_length=4)[0]
    assert b["y"].shape[1] == 4 and b["mask"].sum(1).max() <= 4


def take(root, n, **kw):
    kw = {"batch_size": 2, "num_workers": 2, "shuffle_buffer": 8, **kw}
    return list(itertools.islice(iter(loader.make_loader(root, **kw)), n))


def test_deterministic_given_seed_with_two_workers(encdir):
    root, _ = encdir
    a, b, c = take(root, 8, seed=1), take(root, 8, seed=1), take(root, 8, seed=2)
    assert [x["keys"] for x in a] == [x["keys"] for x in b]
    assert all(isinstance(x["bucket_hw"], tuple) and isinstance(x["bucket"], str) for x in a)
    assert all(torch.equal(x["latent"], y["latent"]) and torch.equal(x["y"], y["y"]) for x, y in zip(a, b))
    assert [x["keys"] for x in a] != [x["keys"] for x in c]


def test_latents_are_fresh_draws_from_the_distribution(encdir):
    root, truth = encdir
    noisy = [k for k, t in truth.items() if t["std"] > 0]
    draws = []
    for batch in take(root, 60, seed=5, batch_size=1, num_workers=0):
        if batch["keys"][0] == noisy[0]:
            draws.append(batch["latent"][0])
    assert len(draws) >= 2 and not torch.equal(draws[0], draws[1])
    stacked = torch.stack(draws) / SCALE  # back to latent units: mean i, std 0.5
    assert abs(stacked.mean().item() - truth[noisy[0]]["i"]) < 0.1 and abs(stacked.std().item() - 0.5) < 0.1


def test_epoch_mode_splits_by_node_and_worker(encdir):
    root, truth = encdir
    seen = []
    for rank in (0, 1):
        dl = loader.make_loader(
            root, batch_size=1, num_workers=2, resample=False, keep_partial=True, rank=rank, world_size=2, seed=0
        )
        seen.append([k for b in dl for k in b["keys"]])
    assert sorted(seen[0] + seen[1]) == sorted(truth) and not set(seen[0]) & set(seen[1])
    ds = loader.make_loader(root, batch_size=1, num_workers=0, resample=False, keep_partial=True).dataset
    first = [b["keys"][0] for b in ds]
    ds.set_epoch(1)
    assert sorted(first) == sorted(b["keys"][0] for b in ds) and first != [b["keys"][0] for b in ds]


def test_bucket_policy(encdir, tmp_path):
    root = tmp_path / "skewed"
    write_encdir(root, {(64, 64): 24, (32, 64): 2}, shard_bytes=3000)
    counts = {
        p: Counter(b["bucket"] for b in take(root, 80, batch_size=1, num_workers=0, bucket_policy=p, seed=0))
        for p in loader.POLICIES
    }
    assert counts["proportional"]["0.50"] < 20  # ~1 in 13 batches
    assert counts["uniform"]["0.50"] > 25  # ~1 in 2
    with pytest.raises(SigmaError, match="bucket_policy"):
        loader.make_loader(root, batch_size=1, bucket_policy="largest")


def test_tier_and_vae_checks(encdir):
    root, _ = encdir
    with pytest.raises(SigmaError, match="tier 256, not 1k"):
        loader.make_loader(root, batch_size=1, tier="1k")
    loader.check_vae(root, SCALE, 4)
    with pytest.raises(SigmaError):
        loader.check_vae(root, SCALE, 16)
    assert loader.null_caption(root).shape == (300, 8)
