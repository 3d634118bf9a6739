"""The training loader: ENCDIR shards -> batches of one bucket, exactly what PixArt's trainer consumes.

A WebDataset pipeline, run inside each DataLoader worker:

    shard source (epoch: shuffled list, split by node and by worker | resampled: endless weighted draws)
    -> tarfile_to_samples -> shuffle buffer -> decode (safetensors) -> per-bucket batching -> collate

Each batch (a dict; see shards/README.md):
    latent   [B, 4, h, w] float32   a fresh draw from N(mean, std), times the VAE scaling factor
    y        [B, L, C]    float32   T5 features padded with zeros to the model length L (300)
    mask     [B, L]       bool      True on the caption's valid tokens
    keys     list[str]              sample keys
    caption  list[str]              the caption each row of `y` encodes
    caption_source list[str]        "original" (probability real_prompt_ratio, when the sample has one) or "recaption"
    bucket   str                    bucket key (height/width ratio, e.g. "0.88")
    bucket_hw tuple[int, int]       the bucket's size in pixels

Randomness (shard order, shuffle buffer, caption choice, latent noise) comes from one generator per
(seed, epoch, rank, worker): the same arguments give the same batches.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
import webdataset as wds

from shards import encoded
from shards.errors import SigmaError

POLICIES = ("proportional", "uniform")  # how often a bucket comes up: as in the data, or all buckets alike


def check_vae(encdir: str | Path, scaling_factor: float, latent_channels: int) -> None:
    """Refuse latents made by another VAE than the one training decodes with (ValueError)."""
    info = encoded.read_info(encdir)
    if abs(info["scaling_factor"] - scaling_factor) > 1e-6 or info["latent_channels"] != latent_channels:
        raise SigmaError(
            f"{encdir}: latents from a VAE with scaling_factor {info['scaling_factor']} and "
            f"{info['latent_channels']} channels; this model expects {scaling_factor} and {latent_channels}"
        )


def null_caption(encdir: str | Path) -> torch.Tensor:
    """The T5 encoding of "" padded to max_length, [L, C] float32: the DiT's `y_embedding`."""
    from safetensors.torch import load_file

    info = encoded.read_info(encdir)
    return load_file(Path(encdir) / info["null_caption"])["y_embedding"]


# ---------------------------------------------------------------------------------------------
# Pipeline stages (plain generators)
# ---------------------------------------------------------------------------------------------


def _shard_weights(encdir: Path, policy: str) -> tuple[list[str], list[float]]:
    """Every committed shard and its draw weight: its sample count, or 1/(bucket's share) for uniform."""
    rows = encoded.committed_rows(encdir)
    counts = rows.groupby("shard").size()
    shards = sorted(counts.index)
    weights = [float(counts[s]) for s in shards]
    if policy == "uniform":
        per_bucket: dict[str, float] = {}
        for s, w in zip(shards, weights):
            per_bucket[Path(s).parent.name] = per_bucket.get(Path(s).parent.name, 0.0) + w
        weights = [w / per_bucket[Path(s).parent.name] for s, w in zip(shards, weights)]
    return [str(encdir / s) for s in shards], weights


def _epoch_shards(shards: list[str], rng: random.Random, rank: int, world_size: int) -> list[dict[str, str]]:
    """One pass: the list shuffled the same way on every rank, then split by node (this rank's share)."""
    order = list(shards)
    rng.shuffle(order)
    return [{"url": s} for s in order[rank::world_size]]


def _resampled_shards(shards: list[str], weights: list[float], rng: random.Random) -> Iterator[dict[str, str]]:
    """Endless weighted draws with replacement (each node and worker has its own stream)."""
    while True:
        yield {"url": rng.choices(shards, weights)[0]}


def _bucket_batches(
    samples: Iterable[dict[str, Any]], batch_size: int, keep_partial: bool
) -> Iterator[list[dict[str, Any]]]:
    """Collect samples per bucket; emit a list as soon as one bucket has `batch_size`."""
    pending: dict[tuple[int, ...], list[dict[str, Any]]] = {}
    for s in samples:
        hw = tuple(s["meta"]["bucket_hw"])
        pending.setdefault(hw, []).append(s)
        if len(pending[hw]) == batch_size:
            yield pending.pop(hw)
    if keep_partial:
        for hw in sorted(pending):
            yield pending[hw]


def _shared_empty(shape: tuple[int, ...]) -> torch.Tensor:
    """A float32 tensor that, in a DataLoader worker, lives in shared memory from the start (as
    torch's default_collate allocates): handing the batch to the trainer then copies nothing. `y` is
    by far the largest tensor (16 x 300 x 4096 x 4 B = 79 MB per batch)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape)
    numel = 1
    for d in shape:
        numel *= d
    # torch leaves its private _typed_storage unannotated
    storage = torch.empty(0)._typed_storage()._new_shared(numel, device="cpu")  # type: ignore[no-untyped-call]
    return torch.empty(0).new(storage).view(shape)


def collate(
    samples: list[dict[str, Any]],
    max_length: int,
    real_prompt_ratio: float,
    scaling_factor: float,
    rng: random.Random,
    gen: torch.Generator,
) -> dict[str, Any]:
    """Samples of one bucket -> the trainer's batch (see the module docstring)."""
    sources = [
        "original" if "original" in s["t5"] and rng.random() < real_prompt_ratio else "recaption" for s in samples
    ]
    feats = [s["t5"][src][:max_length] for s, src in zip(samples, sources)]  # [n_i, C] each
    y = _shared_empty((len(samples), max_length, feats[0].shape[1]))  # [B, L, C]
    mask = torch.zeros(len(samples), max_length, dtype=torch.bool)  # [B, L]
    for i, f in enumerate(feats):
        y[i, : len(f)], y[i, len(f) :], mask[i, : len(f)] = f, 0.0, True
    mean = torch.stack([s["vae"]["mean"] for s in samples]).float()  # [B, 4, h, w]
    std = torch.stack([s["vae"]["std"] for s in samples]).float()  # [B, 4, h, w]
    latent = (mean + std * torch.randn(mean.shape, generator=gen)) * scaling_factor  # [B, 4, h, w]
    meta = samples[0]["meta"]
    return {
        "latent": latent,
        "y": y,
        "mask": mask,
        "keys": [s["__key__"] for s in samples],
        "caption": [s["meta"]["captions"][src] for s, src in zip(samples, sources)],
        "caption_source": sources,
        "bucket": meta["bucket"],
        "bucket_hw": tuple(meta["bucket_hw"]),
    }


# ---------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------


class BucketBatches(torch.utils.data.IterableDataset[dict[str, Any]]):
    """Batches of one bucket from ENCDIR; use with `DataLoader(batch_size=None)` (see `make_loader`)."""

    def __init__(
        self,
        encdir: str | Path,
        batch_size: int,
        model_max_length: int = 300,
        real_prompt_ratio: float = 0.5,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        resample: bool = True,
        shuffle_buffer: int = 128,
        bucket_policy: str = "proportional",
        keep_partial: bool = False,
    ):
        if bucket_policy not in POLICIES:
            raise SigmaError(f"bucket_policy {bucket_policy!r}: choose one of {POLICIES}")
        self.encdir = Path(encdir)
        self.info = encoded.read_info(encdir)
        self.shards, self.weights = _shard_weights(self.encdir, bucket_policy)
        if not self.shards:
            raise SigmaError(f"{encdir}: no encoded shards (did encoding/encode keep any sample?)")
        self.batch_size, self.max_length, self.real_prompt_ratio = batch_size, model_max_length, real_prompt_ratio
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.resample, self.shuffle_buffer, self.keep_partial = resample, shuffle_buffer, keep_partial
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for a new pass (call before iterating; the trainer's sampler.set_epoch)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = torch.utils.data.get_worker_info()
        wid = worker.id if worker else 0
        stream = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{wid}")  # this worker's randomness
        gen = torch.Generator().manual_seed(stream.getrandbits(63))
        if self.resample:
            stages: list[Any] = [partial(_resampled_shards, self.shards, self.weights, stream)]
        else:  # same shuffle on every rank and worker, so the split is a partition
            order = random.Random(f"{self.seed}/{self.epoch}")
            stages = [partial(_epoch_shards, self.shards, order, self.rank, self.world_size), wds.split_by_worker]
        pipeline = wds.DataPipeline(
            *stages,
            wds.tarfile_to_samples(handler=wds.warn_and_continue),
            wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=stream),
            wds.map(encoded.decode_sample),
            partial(_bucket_batches, batch_size=self.batch_size, keep_partial=self.keep_partial),
            wds.map(
                partial(
                    collate,
                    max_length=self.max_length,
                    real_prompt_ratio=self.real_prompt_ratio,
                    scaling_factor=float(self.info["scaling_factor"]),
                    rng=stream,
                    gen=gen,
                )
            ),
        )
        return iter(pipeline)


def make_loader(
    encdir: str | Path,
    batch_size: int,
    model_max_length: int = 300,
    real_prompt_ratio: float = 0.5,
    seed: int = 0,
    num_workers: int = 2,
    rank: int = 0,
    world_size: int = 1,
    resample: bool = True,
    shuffle_buffer: int = 128,
    bucket_policy: str = "proportional",
    tier: str | None = None,
    keep_partial: bool = False,
    pin_memory: bool = False,
) -> torch.utils.data.DataLoader[dict[str, Any]]:
    """A torch DataLoader of one-bucket batches from ENCDIR (see the module docstring for the keys).

    `resample=True` (default) is an endless stream of weighted shard draws: use it for step-based
    training and multi-node (no uneven epoch ends between ranks). `resample=False` is one pass per
    epoch over the shards split by rank and worker (`loader.dataset.set_epoch(e)` reshuffles);
    incomplete bucket batches at the end of a pass are dropped unless `keep_partial`. `tier`, when given, must match the
    tier ENCDIR was encoded at.
    """
    ds = BucketBatches(
        encdir,
        batch_size,
        model_max_length,
        real_prompt_ratio,
        seed,
        rank,
        world_size,
        resample,
        shuffle_buffer,
        bucket_policy,
        keep_partial,
    )
    if tier is not None and ds.info["tier"] != tier:
        raise SigmaError(f"{encdir}: encoded at tier {ds.info['tier']}, not {tier}")
    return torch.utils.data.DataLoader(
        ds, batch_size=None, collate_fn=_as_is, num_workers=num_workers, pin_memory=pin_memory, persistent_workers=False
    )


def _as_is(batch: Any) -> Any:
    """Batches are complete when a worker yields them (the default would turn `bucket_hw` into a list)."""
    return batch
