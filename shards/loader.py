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
    caption_source list[str]        the caption set it came from (`CaptionRule`: fixed weights or CLIP-Score)
    bucket   str                    bucket key (height/width ratio, e.g. "0.88")
    bucket_hw tuple[int, int]       the bucket's size in pixels

Randomness (shard order, shuffle buffer, caption choice, latent noise) comes from one generator per
(seed, epoch, rank, worker): the same arguments give the same batches, so a resume (which restarts
the streams with the same arguments) draws the same captions. Another GPU count (world size) splits
the data among other streams: each sample still gets its caption with the configured probabilities,
but not the same draw as before (training/finetune's virtual ranks keep the draws when only the
process layout changes, e.g. 2 GPUs x accum 1 vs 1 GPU x accum 2).

Caption sets (shards/encoded.py): the sets a rule can draw are read beside each tar, in lockstep
with it (side files), or from inside it (version 1 folders); a sample that has none of them is
skipped. The rule (`caption_rule`):
- fixed weights {set: weight}: a sample's sets of positive weight, renormalised over those it has;
  a set of weight 0 is used only by a sample that has no set of positive weight. `real_prompt_ratio`
  r is the weights {original: r, recaption: 1 - r}: the same distribution as before caption sets,
  and for 0 < r < 1 the same draws.
- CLIP-Score (Sana's `weighted_sample_clipscore`): among the sample's scored sets, those scoring
  >= threshold are candidates, drawn with probability score ** (1 / T) / sum; none: the best-scoring
  set (the first of equal best); no scored set at all: the fixed weights.
One set present (or one candidate): no random number is drawn.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import webdataset as wds

from shards import cache as cache_mod
from shards import encoded, storage
from shards.cache import ShardCache
from shards.errors import SigmaError

POLICIES = ("proportional", "uniform")  # how often a bucket comes up: as in the data, or all buckets alike


def check_vae(encdir: encoded.Place, scaling_factor: float, latent_channels: int) -> None:
    """Refuse latents made by another VAE than the one training decodes with (ValueError)."""
    info = encoded.read_info(encdir)
    if abs(info["scaling_factor"] - scaling_factor) > 1e-6 or info["latent_channels"] != latent_channels:
        raise SigmaError(
            f"{encdir}: latents from a VAE with scaling_factor {info['scaling_factor']} and "
            f"{info['latent_channels']} channels; this model expects {scaling_factor} and {latent_channels}"
        )


def null_caption(encdir: encoded.Place) -> torch.Tensor:
    """The T5 encoding of "" padded to max_length, [L, C] float32: the DiT's `y_embedding`."""
    from safetensors.torch import load

    info = encoded.read_info(encdir)
    return load((encoded.place(encdir) / info["null_caption"]).read_bytes())["y_embedding"]


# ---------------------------------------------------------------------------------------------
# Which caption a sample trains on
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptionRule:
    """Fixed weights per set (in the order written), or Sana's CLIP-Score rule over the same sets."""

    weights: dict[str, float] = field(default_factory=dict)
    clip_score: bool = False
    threshold: float = 0.0
    temperature: float = 1.0
    where: str = field(default="captions", compare=False)  # the config key, for messages

    @property
    def sets(self) -> list[str]:
        return list(self.weights)


def caption_rule(
    weights: dict[str, float] | None = None,
    real_prompt_ratio: float = 0.5,
    clip_score: bool = False,
    threshold: float = 0.0,
    temperature: float = 1.0,
    where: str = "captions",
) -> CaptionRule:
    """The rule a stage's config asks for; `weights` None or {}: {original: r, recaption: 1 - r}. Bad input is
    one line: a negative weight, weights that do not sum to a positive number, a temperature <= 0."""
    if not weights:
        weights = {encoded.ORIGINAL: real_prompt_ratio, encoded.RECAPTION: 1.0 - real_prompt_ratio}
    for name, w in weights.items():
        encoded.check_set_name(name, f"{where}.weights")
        if not (w >= 0 and math.isfinite(w)):
            raise SigmaError(f"{where}.weights.{name}: {w!r}: a weight is a number >= 0")
    if not sum(weights.values()) > 0:
        raise SigmaError(f"{where}.weights: {weights} do not sum to a positive number")
    if not temperature > 0:
        raise SigmaError(f"{where}.clip_temperature: {temperature!r}: the temperature must be > 0")
    return CaptionRule(dict(weights), clip_score, float(threshold), float(temperature), where)


def choose_weighted(present: list[str], weights: dict[str, float], rng: random.Random) -> str:
    """Fixed weights renormalised over the sets a sample has (see the module docstring)."""
    positive = [n for n in present if weights[n] > 0] or present[:1]
    if len(positive) == 1:
        return positive[0]
    u, acc = rng.random() * sum(weights[n] for n in positive), 0.0
    for n in positive:
        acc += weights[n]
        if u < acc:
            return n
    return positive[-1]  # u at the very top (rounding)


def choose_clip(scores: dict[str, float], threshold: float, temperature: float, rng: random.Random) -> str:
    """Sana's rule on {set: CLIP-Score} (scores of the sets a sample has): candidates >= threshold, drawn
    with weights score ** (1 / T) normalised; none: the best-scoring set."""
    labels = [n for n, s in scores.items() if s >= threshold]
    if not labels:
        return max(scores, key=lambda n: scores[n])  # the first of equal best, as Sana's strict `>`
    if len(labels) == 1:
        return labels[0]
    adjusted = [scores[n] ** (1.0 / temperature) for n in labels]
    total = sum(adjusted)
    if total <= 0:  # every candidate scored 0 (threshold 0): Sana's weights would be NaN; equal chances here
        return rng.choices(labels, k=1)[0]
    return rng.choices(labels, weights=[a / total for a in adjusted], k=1)[0]


def choose(sample: dict[str, Any], rule: CaptionRule, rng: random.Random) -> str:
    """The caption set a sample trains on this draw (it has at least one of the rule's sets)."""
    present = [n for n in rule.weights if n in sample["t5"]]
    if rule.clip_score:
        scored = {n: sample["clip"][n] for n in present if rule.weights[n] > 0 and n in sample["clip"]}
        if scored:
            return choose_clip(scored, rule.threshold, rule.temperature, rng)
    return choose_weighted(present, rule.weights, rng)


# ---------------------------------------------------------------------------------------------
# Pipeline stages (plain generators)
# ---------------------------------------------------------------------------------------------


def _shard_weights(encdir: storage.Loc, policy: str, rows: Any) -> tuple[list[str], list[float]]:
    """Every committed shard and its draw weight: its sample count, or 1/(bucket's share) for uniform."""
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


def _samples(
    sources: Iterable[dict[str, str]],
    sets: list[str],
    dim: int,
    remote: BucketShards | None = None,
    ahead: bool = False,
) -> Iterator[dict[str, Any]]:
    """Shard draws -> decoded samples with their caption sets, one pass over a tar at a time (the same
    tar drawn twice in a row is read twice, its set files too). On disk each tar is read where it lies;
    from a bucket (`remote`) through the node's cache, fetched ahead where the order is known."""
    if remote is not None:
        yield from remote.samples(sources, sets, dim, ahead)
        return
    read_tar = wds.tarfile_to_samples(handler=wds.warn_and_continue)
    for src in sources:
        readers: dict[str, Iterator[dict[str, Any]]] = {}
        for name in sets:
            side = encoded.set_file(storage.resolve(src["url"]), name)
            if side.exists():  # an exact-name lookup, one per (tar, set)
                readers[name] = encoded.read_set(side)
        yield from _with_sets(read_tar(iter([src])), readers, sets, dim)


def _with_sets(
    samples: Iterable[dict[str, Any]], readers: dict[str, Iterator[dict[str, Any]]], sets: list[str], dim: int
) -> Iterator[dict[str, Any]]:
    """One tar's raw samples -> {"__key__", "__url__", "meta", "vae", "t5": {set: [n, C] or what makes it},
    "caption": {set: text}, "clip": {set: score}} with the rule's sets: inline ones from the tar, side files'
    rows (`readers`) read in lockstep (one row group at a time). Samples with none of the sets are dropped."""
    for raw in samples:
        s = encoded.decode_sample(raw)
        meta, key = s["meta"], s["__key__"]
        t5 = {n: f for n, f in s.pop("t5").items() if n in sets}  # version 1: inline recaption / original
        texts = {n: meta.get("captions", {}).get(n, "") for n in t5}
        clip: dict[str, float] = {}
        for name, rows in readers.items():
            for row in rows:  # same order as the tar: skips only rows of samples the tar reader dropped
                if row["key"] == key:
                    if row["t5"] is not None:  # features made a tensor only if the rule draws this set
                        t5[name], texts[name] = partial(encoded.set_features, row, dim), row["caption"]
                        if row["clip_score"] is not None and not math.isnan(row["clip_score"]):
                            clip[name] = float(row["clip_score"])
                    break
        if t5:
            yield {**s, "t5": t5, "caption": texts, "clip": clip}


def _tensor(features: torch.Tensor | Callable[[], torch.Tensor]) -> torch.Tensor:
    """A sample's features of one set: inline ones are tensors already, a side file's are made on demand."""
    return features if isinstance(features, torch.Tensor) else features()


def collate(
    samples: list[dict[str, Any]],
    max_length: int,
    rule: CaptionRule,
    scaling_factor: float,
    rng: random.Random,
    gen: torch.Generator,
) -> dict[str, Any]:
    """Samples of one bucket -> the trainer's batch (see the module docstring)."""
    sources = [choose(s, rule, rng) for s in samples]
    feats = [_tensor(s["t5"][src])[:max_length] for s, src in zip(samples, sources)]  # [n_i, C] each
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
        "caption": [s["caption"][src] for s, src in zip(samples, sources)],
        "caption_source": sources,
        "bucket": meta["bucket"],
        "bucket_hw": tuple(meta["bucket_hw"]),
    }


# ---------------------------------------------------------------------------------------------
# Shards in a bucket: read through the node's cache
# ---------------------------------------------------------------------------------------------


class BucketShards:
    """The tars of an ENCDIR in a bucket and their caption sets' files, read through a ShardCache.

    Made in the main process: one listing of ENCDIR/shards gives each object's ETag and size (its cache
    key; an object missing from the listing, which some stores serve late, is looked up by its exact
    name). In a loader worker a drawn tar and its sets' files come from the cache, so the bytes and their
    order are those read from disk.

    Read-ahead: where the order is known (epoch mode) a background thread of each worker fetches the
    next `read_ahead` shards whole while one is read. A resampled draw is known only when the shard
    before it ends: it comes from the worker's one generator, which the shuffle buffer and the caption
    choice draw from in between, so drawing it earlier would change the draws. A missed shard is then
    read as it arrives (`ShardCache.open(stream=True)`: a background thread per file downloads it in
    ranged GETs, a set file's footer first, and the reader waits only for the bytes it needs), so the
    wait is about one request's latency, which the batches the DataLoader already holds
    (prefetch_factor per worker) cover. A cache that holds the data set (storage.cache.max_bytes)
    fetches each object once per node.
    """

    def __init__(self, encdir: storage.Loc, cache: ShardCache, read_ahead: int = 2):
        self.encdir, self.cache, self.read_ahead = encdir, cache, read_ahead
        root = encdir / encoded.SHARDS
        try:
            found = root.fs.find(root.path, detail=True)
        except FileNotFoundError:
            found = {}
        self.objects: dict[str, tuple[str | None, int] | None] = {
            f"{encdir.scheme}://{path}": cache_mod.version(info) for path, info in found.items()
        }
        listing = json.dumps(sorted(self.objects.items())).encode()
        self.listing = hashlib.sha256(listing).hexdigest()  # what the shards are now: the key of _ROWS

    def _object(self, loc: storage.Loc) -> tuple[str | None, int] | None:
        """(ETag, size) of an object, None if it does not exist."""
        if loc.url not in self.objects:
            try:
                self.objects[loc.url] = cache_mod.version(loc.fs.info(loc.path))
            except FileNotFoundError:
                self.objects[loc.url] = None
        return self.objects[loc.url]

    def _files(self, url: str, sets: list[str]) -> list[tuple[str, storage.Loc, tuple[str | None, int]]]:
        """("" for the tar or the set's name, its place, its version) of one shard's files that exist."""
        tar = self.encdir / url[len(self.encdir.url) :]
        got = self._object(tar)
        if got is None:
            raise SigmaError(f"{tar}: not found (was the encoded folder changed during training?)")
        out = [("", tar, got)]
        for name in sets:
            side = encoded.set_file(tar, name)
            version = self._object(side)
            if version is not None:
                out.append((name, side, version))
        return out

    def fetch(self, url: str, sets: list[str]) -> None:
        """One shard's files into the cache (the read-ahead thread's job)."""
        for _, loc, (etag, size) in self._files(url, sets):
            self.cache.fetch(loc, etag, size)

    def samples(
        self, sources: Iterable[dict[str, str]], sets: list[str], dim: int, ahead: bool
    ) -> Iterator[dict[str, Any]]:
        """The `_samples` stage for a bucket; `ahead`: the sources are a known list (epoch mode)."""
        from concurrent.futures import Future, ThreadPoolExecutor

        pending: dict[str, Future[None]] = {}
        todo = list(sources) if ahead and self.read_ahead else None
        pool = ThreadPoolExecutor(1, thread_name_prefix="read-ahead") if todo else None
        try:
            for i, src in enumerate(todo if todo is not None else sources):
                if pool is not None and todo is not None:
                    for nxt in todo[i + 1 : i + 1 + self.read_ahead]:
                        if nxt["url"] not in pending:
                            pending[nxt["url"]] = pool.submit(self.fetch, nxt["url"], sets)
                    if src["url"] in pending:
                        pending.pop(src["url"]).result()
                yield from self._read(src["url"], sets, dim)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def _read(self, url: str, sets: list[str], dim: int) -> Iterator[dict[str, Any]]:
        from webdataset import tariterators

        with contextlib.ExitStack() as stack:
            opened = {}
            for name, loc, (etag, size) in self._files(url, sets):
                opened[name] = stack.enter_context(self.cache.open(loc, etag, size, stream=True))
            tar = opened.pop("")
            files = tariterators.tar_file_expander(iter([{"url": url, "stream": tar}]), handler=_storage_faults_stop)
            raw = tariterators.group_by_keys(files, handler=_storage_faults_stop)
            readers = {name: encoded.read_set(f) for name, f in opened.items()}
            yield from _with_sets(raw, readers, sets, dim)


def _storage_faults_stop(e: Exception) -> bool:
    """webdataset's handler for a tar read from the cache: a damaged tar is skipped with a warning, as on
    disk, but a storage fault (SigmaError: the object gone, the endpoint down) stops the loader in one
    line instead of skipping every shard drawn after it."""
    if isinstance(e, SigmaError):
        raise SigmaError(str(e.args[0])) from None  # webdataset appends the tar's stream and URL to its args
    return bool(wds.warn_and_continue(e))


# ---------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------


class BucketBatches(torch.utils.data.IterableDataset[dict[str, Any]]):
    """Batches of one bucket from ENCDIR; use with `DataLoader(batch_size=None)` (see `make_loader`)."""

    def __init__(
        self,
        encdir: encoded.Place,
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
        rule: CaptionRule | None = None,
        cache: ShardCache | None = None,
        read_ahead: int = 2,
    ):
        if bucket_policy not in POLICIES:
            raise SigmaError(f"bucket_policy {bucket_policy!r}: choose one of {POLICIES}")
        self.encdir = encoded.place(encdir)
        self.remote = None
        if not self.encdir.is_local:
            if cache is None:
                raise SigmaError(f"{self.encdir}: an ENCDIR in a bucket is read through a cache (make_loader(cache=))")
            self.remote = BucketShards(self.encdir, cache, read_ahead)
        self.info = encoded.read_info(self.encdir)
        self.rule = rule if rule is not None else caption_rule(real_prompt_ratio=real_prompt_ratio)
        self.rows = _committed_rows(self.encdir, self.rule.sets, self.remote)
        self.shards, self.weights = _shard_weights(self.encdir, bucket_policy, self.rows)
        if not self.shards:
            raise SigmaError(f"{encdir}: no encoded shards (did encoding/encode keep any sample?)")
        self.coverage = check_sets(self.encdir, self.info, self.rows, self.rule, explicit=rule is not None)
        self.batch_size, self.max_length = batch_size, model_max_length
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
            partial(
                _samples, sets=self.rule.sets, dim=int(self.info["t5_dim"]), remote=self.remote, ahead=not self.resample
            ),
            wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=stream),
            partial(_bucket_batches, batch_size=self.batch_size, keep_partial=self.keep_partial),
            wds.map(
                partial(
                    collate,
                    max_length=self.max_length,
                    rule=self.rule,
                    scaling_factor=float(self.info["scaling_factor"]),
                    rng=stream,
                    gen=gen,
                )
            ),
        )
        return iter(pipeline)


_ROWS: dict[tuple[str, tuple[str, ...], str], Any] = {}  # a bucket ENCDIR's rows per (URL, sets, listing)


def _committed_rows(encdir: storage.Loc, sets: list[str], remote: BucketShards | None) -> Any:
    """encoded.committed_rows; for a bucket kept per process while its shards' listing is the same, so that
    a loader restarted with the same data (training/finetune, at each checkpoint) reads no row file again
    (a bucket ENCDIR costs a few requests per tar to read them)."""
    if remote is None:
        return encoded.committed_rows(encdir, sets)
    key = (encdir.url, tuple(sets), remote.listing)
    if key not in _ROWS:
        if len(_ROWS) >= 4:
            del _ROWS[next(iter(_ROWS))]
        _ROWS[key] = encoded.committed_rows(encdir, sets)
    return _ROWS[key]


def check_sets(
    encdir: storage.Loc, info: dict[str, Any], rows: Any, rule: CaptionRule, explicit: bool
) -> dict[str, int]:
    """{set: samples that have it} for the rule's sets; one-line errors for a set the data does not hold, a
    set of positive weight missing for most samples (explicit weights only: the default mapping keeps
    working on data without alt texts), no sample with any of the sets, CLIP-Score with no score."""
    held = encoded.caption_sets(info)
    for name in rule.sets:
        if name not in held and (rows[encoded.len_column(name)] == 0).all():
            raise SigmaError(
                f"{rule.where}.weights: caption set {name!r} is not in {encdir} (it holds {', '.join(sorted(held))})"
            )
    coverage = {n: int((rows[encoded.len_column(n)] > 0).sum()) for n in rule.sets}
    total = len(rows)
    for name in rule.sets:
        if explicit and rule.weights[name] > 0 and coverage[name] * 2 < total:
            raise SigmaError(
                f"{rule.where}.weights: caption set {name!r} is missing for {total - coverage[name]} of {total} "
                f"samples of {encdir}; encode it for them (encoding/encode --captions {name}=...) or drop it"
            )
    if total and not any(coverage.values()):
        raise SigmaError(f"{encdir}: no sample has any of the caption sets {rule.sets}")
    if rule.clip_score:
        scored = sum(int(rows[encoded.clip_column(n)].notna().sum()) for n in rule.sets)
        if not scored:
            raise SigmaError(
                f"{rule.where}.clip_score: no caption of {rule.sets} in {encdir} has a CLIP-Score "
                "(encode with CLIP-Scores, see encoding/README.md, or use fixed weights)"
            )
    return coverage


def make_loader(
    encdir: encoded.Place,
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
    rule: CaptionRule | None = None,
    cache: ShardCache | None = None,
    read_ahead: int = 2,
) -> torch.utils.data.DataLoader[dict[str, Any]]:
    """A torch DataLoader of one-bucket batches from ENCDIR (see the module docstring for the keys).

    `resample=True` (default) is an endless stream of weighted shard draws: use it for step-based
    training and multi-node (no uneven epoch ends between ranks). `resample=False` is one pass per
    epoch over the shards split by rank and worker (`loader.dataset.set_epoch(e)` reshuffles);
    incomplete bucket batches at the end of a pass are dropped unless `keep_partial`. `tier`, when given, must match the
    tier ENCDIR was encoded at. `rule` (`caption_rule(...)`): which caption set each sample trains on;
    None: `real_prompt_ratio`'s {original: r, recaption: 1 - r}. An ENCDIR in a bucket (a Loc resolved with
    the storage options) is read through `cache` (shards/cache.py), `read_ahead` shards ahead where the
    order is known (`BucketShards`); a local ENCDIR is read in place.
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
        rule,
        cache,
        read_ahead,
    )
    if tier is not None and ds.info["tier"] != tier:
        raise SigmaError(f"{encdir}: encoded at tier {ds.info['tier']}, not {tier}")
    return torch.utils.data.DataLoader(
        ds, batch_size=None, collate_fn=_as_is, num_workers=num_workers, pin_memory=pin_memory, persistent_workers=False
    )


def worker_error(e: SigmaError) -> SigmaError:
    """A SigmaError raised in a DataLoader worker (an object gone from the bucket mid-run) as its one line:
    torch re-raises it in the main process with the worker's traceback in the message."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    return SigmaError(lines[-1].removeprefix(f"{SigmaError.__module__}.{SigmaError.__name__}: ") if lines else str(e))


def _as_is(batch: Any) -> Any:
    """Batches are complete when a worker yields them (the default would turn `bucket_hw` into a list)."""
    return batch
