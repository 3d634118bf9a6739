"""`pipelines.yaml` -> typed dataclasses, validated once at the edge.

The file has one section per stage plus `models`, and a `profiles:` mapping whose entries are
deep-merged over the base before validation (`real`: the published models; `demo`: tiny models
built offline). `--set a.b.c=value` overrides any key after the profile. Every error is one line
naming the key path, e.g. `training.stages.2k.lr: expected float, got 'fast'`.

Each stage owns its section's dataclass here, because the config file is part of the contract
(which is why this module runs past 400 lines: one short dataclass per section, nothing else).
Model references are a local path or a hub id; relative paths are resolved against the folder
of the config file when they exist there.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
import types
import typing
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from shards import cache
from shards.errors import SigmaError
from shards.fingerprint import OUTPUT

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "pipelines.yaml"
# `.cache/...` paths missing beside the config file are looked up here: a `ray job submit --working-dir .`
# uploads the checkout without its git-ignored .cache/, and demo/tiny_models.py mirrors the tiny models here.
USER_CACHE = cache.ROOT


# Field metadata for a setting that does not change what its stage writes (concurrency, courtesy, where
# to write, how far to train): shards/fingerprint.py leaves it out of the stage's fingerprint.
SAME_OUTPUT = {OUTPUT: False}


def num(
    default: Any, ge: float | None = None, gt: float | None = None, le: float | None = None, output: bool = True
) -> Any:
    """A numeric field with its valid range (checked once, at load): `timeout: int = num(10, ge=1)`;
    `output=False`: it does not change what the stage writes (see SAME_OUTPUT)."""
    return field(default=default, metadata={"range": (ge, gt, le), OUTPUT: output})


def _check_range(value: Any, bounds: tuple[float | None, ...], where: str) -> None:
    ge, gt, le = bounds
    if isinstance(value, list):
        for i, v in enumerate(value):
            _check_range(v, bounds, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            _check_range(v, bounds, f"{where}.{k}")
        return
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if (ge is not None and value < ge) or (gt is not None and value <= gt) or (le is not None and value > le):
        want = [
            f">= {ge}" if ge is not None else "",
            f"> {gt}" if gt is not None else "",
            f"<= {le}" if le is not None else "",
        ]
        raise SigmaError(f"{where}: {value!r} is out of range (expected {' and '.join(w for w in want if w)})")


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


@dataclass
class RayConfig:
    address: str | None = None  # None: join the cluster `ray job submit` set up, else start a local one
    num_cpus: int | None = num(None, ge=1)  # only for a local cluster


@dataclass
class StoreOptions:
    """How to reach one object store (credentials never here: the store's own environment, shared config,
    instance or pod role; shards/storage.py)."""

    endpoint_url: str | None = field(default=None, metadata=SAME_OUTPUT)  # MinIO/Ceph/moto; null: the store's default
    region: str | None = field(default=None, metadata=SAME_OUTPUT)
    anon: bool = field(default=False, metadata=SAME_OUTPUT)  # public buckets: no credentials looked up
    profile: str | None = field(default=None, metadata=SAME_OUTPUT)  # s3: a profile of ~/.aws/config
    project: str | None = field(default=None, metadata=SAME_OUTPUT)  # gs: the billing project
    account_name: str | None = field(default=None, metadata=SAME_OUTPUT)  # az: the storage account
    retries: int = num(10, ge=1, output=False)  # s3: attempts per request (SlowDown, 503, dropped connections)


@dataclass
class CacheConfig:
    """Local copies of what is read from a bucket (shards/cache.py): training shards, bounded and evicted
    least recently used first, and model folders given as bucket URLs, copied once. Folders None: below
    SIGMAFORGE_CACHE (default ~/.cache/sigmaforge). A node that loses its disk starts with an empty cache."""

    folder: str | None = field(default=None, metadata=SAME_OUTPUT)  # training shards; None: <cache>/shards
    max_bytes: int = num(100 * 2**30, ge=1, output=False)  # shards kept; beyond: least recently used removed
    read_ahead: int = num(2, ge=0, output=False)  # shards each loader worker fetches ahead when it knows them
    models: str | None = field(default=None, metadata=SAME_OUTPUT)  # model folders from a bucket; None: <cache>/models

    @property
    def shards_folder(self) -> Path:
        return Path(self.folder).expanduser() if self.folder else cache.SHARDS

    @property
    def models_folder(self) -> Path:
        return Path(self.models).expanduser() if self.models else cache.MODELS


@dataclass
class StorageConfig:
    """`storage_options` per scheme for paths given as bucket URLs (s3://, gs://, az://), and the local cache."""

    s3: StoreOptions = field(default_factory=StoreOptions)
    gs: StoreOptions = field(default_factory=StoreOptions)
    az: StoreOptions = field(default_factory=StoreOptions)
    cache: CacheConfig = field(default_factory=CacheConfig)


@dataclass
class ClipModel:
    arch: str = "ViT-L-14-quickgelu"  # LAION heads were trained on OpenAI L/14 (QuickGELU) embeddings
    weights: str = "openai"  # open_clip pretrained tag, or a local weights file
    config_dir: str | None = None  # folder of extra open_clip model-config JSONs (tiny offline models)


@dataclass
class Models:
    clip: ClipModel = field(default_factory=ClipModel)
    aesthetic_head: str = "sac+logos+ava1-l14-linearMSE.pth"  # LAION improved aesthetic predictor (put the file here)
    nsfw_head: str | None = None  # LAION clip-autokeras-binary-nsfw weights, local
    watermark: str | None = None  # LAION watermark detector weights (timm efficientnet_b3a), local
    t5: str = "google/t5-v1_1-xxl"  # T5 encoder folder or hub id (tokenizer in the same place); 4096-d features
    vae: str = "stabilityai/sdxl-vae"  # diffusers AutoencoderKL folder or hub id; SDXL: scaling factor 0.13025
    dit: str = "XL/2"  # a named size in training/model.py; XL/2: hidden 1152, depth 28, 16 heads, 610.9M parameters
    dit_weights: str | None = None  # PixArt-Sigma checkpoint to start from (.pth / .safetensors / diffusers dir)


@dataclass
class Resources:
    """How a Ray actor pool is sized."""

    batch_size: int = num(16, ge=1)
    num_gpus: float = num(0.0, ge=0)
    num_cpus: float = num(1.0, ge=0)
    concurrency: int = num(1, ge=1)


@dataclass
class DownloadConfig:
    # download shards in flight at once (Ray tasks, one img2dataset Downloader each)
    processes: int = num(8, ge=1, output=False)
    threads: int = num(32, ge=1, output=False)  # requests in flight per shard
    # Ray CPUs per download task: I/O-bound; decoding is in its own 1-CPU tasks
    num_cpus: float = num(0.25, ge=0, output=False)
    timeout: int = num(10, ge=1)  # seconds per network operation (connect, one read)
    max_seconds: float = num(30.0, gt=0)  # total per request (connect + headers + body) -> `timeout`
    # per body -> `too_large`; a 4K (3840x2160) RGBA PNG is <= 33 MB uncompressed
    max_bytes: int = num(64 * 2**20, ge=1)
    retries: int = num(2, ge=0)
    max_retry_after: float = num(60.0, ge=0)  # longest Retry-After (429/503) waited for; beyond: http_429 / http_503
    shard_size: int = num(10_000, ge=1)  # URLs per img2dataset shard: the unit of work and of resumption
    # requests in flight per host from all download processes of a node (<= curation.hosts.MAX_LIMIT)
    per_domain_limit: int = num(4, ge=1, le=256, output=False)
    allow_networks: list[str] = field(default_factory=list)  # CIDRs besides the global internet, e.g. [10.1.2.0/24]
    robots_txt: bool = True  # read each origin's robots.txt and honour it for our user-agent token
    # set it: https://your.site/crawler or mailto:you@your.site, sent in the user agent
    contact: str | None = field(default=None, metadata=SAME_OUTPUT)
    user_agent_token: str | None = "sigmaforge"
    disallowed_header_directives: list[str] = field(
        default_factory=lambda: ["noai", "noimageai", "none", "noindex", "noimageindex"]
    )

    def __post_init__(self) -> None:  # the numbers' ranges are checked at load (num); these are formats
        where = "curation.download"
        for i, cidr in enumerate(self.allow_networks):
            try:
                ipaddress.ip_network(cidr, strict=True)
            except ValueError as e:
                raise SigmaError(f"{where}.allow_networks[{i}]: not a CIDR network ({e})") from None
        if self.contact is not None and not self.contact.startswith(("http://", "https://", "mailto:")):
            raise SigmaError(f"{where}.contact: expected an http(s):// or mailto: URL, got {self.contact!r}")


@dataclass
class QualityConfig:
    enabled: bool = True
    min_sharpness: float = num(20.0, ge=0)  # variance of the Laplacian on a 512-px grey copy
    min_contrast: float = num(10.0, ge=0)  # std of grey levels (0..255)
    min_brightness: float = num(10.0, ge=0, le=255)  # mean grey level
    max_brightness: float = num(245.0, ge=0, le=255)


@dataclass
class ThresholdFilter:
    enabled: bool = True
    threshold: float = num(0.5, ge=0, le=10)  # aesthetic: a 1..10 score; NSFW, watermark: 0..1 (kept below it)


@dataclass
class DedupConfig:
    enabled: bool = True
    phash_radius: int = num(4, ge=0, le=64)  # Hamming distance on a 64-bit perceptual hash
    clip_similarity: float | None = num(0.96, ge=-1, le=1)  # cosine similarity on CLIP embeddings; None: off
    cluster_size: int = num(2_000, ge=1)  # mean embeddings per k-means cluster (semantic dedup compares inside one)
    probe: int = num(2, ge=1)  # nearest clusters each embedding joins (recall at cluster borders)
    max_group: int = num(50_000, ge=1)  # distinct pHashes compared all pairs in one band group; beyond: windows
    partition_rows: int = num(20_000, ge=1, output=False)  # URLs per partition of the dedup job's shuffle


@dataclass
class CurationConfig:
    download: DownloadConfig = field(default_factory=DownloadConfig)
    url_col: str | None = None  # the input's URL column; null: url, URL, ... (curation/inputs.py)
    caption_col: str | None = None  # the alt-text column; null: caption, TEXT, text, alt, ...
    image_col: str | None = None  # a table's image-bytes column (--images); null: image, ... or the only one
    min_tier: Literal["1k", "2k", "4k"] = "1k"
    max_pixels: int = num(64_000_000, ge=1)  # decompression-bomb guard, well above 4K (3840x2160 = 8.3 MP)
    measure_seconds: float = num(60.0, gt=0)  # deadline per image decode -> `timeout` (a 64 MP PNG decodes in a few s)
    quality: QualityConfig = field(default_factory=QualityConfig)
    # LAION-Aesthetics subsets use 5, 6, 6.5 on the 1-10 scale; LAION keeps punsafe < 0.5 and pwatermark < 0.8
    aesthetic: ThresholdFilter = field(default_factory=lambda: ThresholdFilter(True, 5.0))
    aesthetic_resources: Resources = field(default_factory=lambda: Resources(64, 1.0, 4.0, 8), metadata=SAME_OUTPUT)
    nsfw: ThresholdFilter = field(default_factory=lambda: ThresholdFilter(False, 0.5))
    watermark: ThresholdFilter = field(default_factory=lambda: ThresholdFilter(False, 0.8))
    dedup: DedupConfig = field(default_factory=DedupConfig)
    shard_size: int = num(1000, ge=1)  # kept images per output shard


@dataclass
class Captioner:
    backend: Literal["hf", "share-captioner", "vllm", "original"] = "hf"  # original: the alt text, no model
    model: str = ""  # local folder or hub id
    revision: str | None = None
    # refuse to run until `revision` pins a hub commit (shipped hub configs)
    require_revision: bool = field(default=False, metadata=SAME_OUTPUT)
    trust_remote_code: bool = field(default=False, metadata=SAME_OUTPUT)  # only on explicit opt-in
    dtype: Literal["float32", "float16", "bfloat16"] = "bfloat16"
    prompt: str = "Describe this image in detail."
    max_new_tokens: int = num(300, ge=1)
    generate: dict[str, Any] = field(default_factory=dict)  # extra generate() kwargs
    max_pixels: int | None = num(None, ge=1)  # Qwen2.5-VL style cap for 4K inputs
    # Ray runtime_env for this backend's actors
    runtime_env: dict[str, Any] = field(default_factory=dict, metadata=SAME_OUTPUT)
    engine_kwargs: dict[str, Any] = field(default_factory=dict)  # vllm: vllm.LLM(...) arguments
    retry: dict[str, Any] = field(
        default_factory=dict
    )  # sampling settings for one retry of guard-failed rows; {}: none
    resources: Resources = field(default_factory=lambda: Resources(batch_size=8), metadata=SAME_OUTPUT)


@dataclass
class GuardConfig:
    """The caption-quality guard (captioning/guard.py): which generated captions are failed rows."""

    enabled: bool = True
    language: Literal["en"] | None = "en"  # the prompt's language; None: no language rule
    min_words: int = num(3, ge=1)  # fewer words: empty_caption
    min_latin: float = num(0.7, ge=0, le=1)  # share of Latin-script letters an English caption needs
    truncation: bool = True  # text cut at the token limit is truncated_caption


@dataclass
class CaptioningConfig:
    captioner: str = "share-captioner"  # a key of `captioners`
    captioners: dict[str, Captioner] = field(default_factory=dict)  # named entries: pipelines.yaml
    strip_openings: bool = True  # drop "The image shows ..." style openings
    token_budget: int = num(300, ge=1)  # T5 tokens PixArt-Sigma keeps
    guard: GuardConfig = field(default_factory=GuardConfig)


@dataclass
class EncodeConfig:
    t5_max_length: int = num(300, ge=1)
    t5_dtype: Literal["float32", "float16", "bfloat16"] = "bfloat16"
    vae_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # SDXL VAE overflows in fp16
    vae_tiling: bool = False  # for 2K/4K on small GPUs; tiles can show faint seams in latents
    vae_slicing: bool = field(default=False, metadata=SAME_OUTPUT)  # decodes slice by slice: the same latents
    shard_bytes: int = num(1_000_000_000, ge=1, output=False)  # how samples are grouped in tars, not their bytes
    # CLIP-Score of each caption with models.clip (encoding/clipscore.py); extra columns, latents unchanged,
    # so a folder encoded without them resumes
    clip_score: bool = field(default=True, metadata=SAME_OUTPUT)
    t5_resources: Resources = field(default_factory=lambda: Resources(64, 1.0, 4.0, 8), metadata=SAME_OUTPUT)
    vae_resources: Resources = field(default_factory=lambda: Resources(8, 1.0, 4.0, 8), metadata=SAME_OUTPUT)


@dataclass
class CaptionChoice:
    """Which caption set a sample trains on, drawn per sample per draw (shards/loader.py `caption_rule`)."""

    # {set: weight}, e.g. {original: 0.05, share: 0.6, qwen: 0.35}: renormalised over the sets a sample has;
    # {}: {original: real_prompt_ratio, recaption: 1 - real_prompt_ratio} (configs from before caption sets)
    weights: dict[str, float] = field(default_factory=dict, metadata={"range": (0, None, None)})  # each value
    # Sana's rule among the sets of `weights`: CLIP-Score >= clip_threshold are candidates, weighted
    # score ** (1 / clip_temperature); none: the best-scoring one; a sample without scores: the weights
    clip_score: bool = False
    clip_threshold: float = num(0.0, ge=0, le=100)  # CLIP-Score scale 0..100 (100 * cosine)
    clip_temperature: float = num(1.0, gt=0)  # < 1 sharpens towards the best caption, > 1 flattens


@dataclass
class Stage:
    # parent, data, steps: a resume may change them (a moved ENCDIR, more steps): not in the run's fingerprint
    parent: str | None = field(default=None, metadata=SAME_OUTPUT)  # stage whose output this one starts from
    data: str | None = field(default=None, metadata=SAME_OUTPUT)  # ENCDIR; default from --data
    tier: str = "1k"  # which encoded tier (bucket table) it trains on
    vae: str | None = None  # latents must come from this VAE; None: models.vae
    pe_interpolation: float = num(2.0, gt=0)  # resolution / 512
    multi_scale: bool = True  # False: fixed square position embedding (the 256 stage)
    kv_compress: bool = False
    kv_compress_layers: list[int] = field(default_factory=list, metadata={"range": (0, None, None)})  # each item
    kv_compress_ratio: int = num(2, ge=1)
    optimizer: Literal["adamw", "came"] = "adamw"
    lr: float = num(2e-5, gt=0)
    weight_decay: float = num(0.0, ge=0)
    warmup_steps: int = num(100, ge=0)
    grad_clip: float = num(0.01, gt=0)
    grad_accum: int = num(1, ge=1)
    batch_size: int = num(4, ge=1)  # per process
    steps: int = num(1000, ge=1, output=False)
    real_prompt_ratio: float = num(0.5, ge=0, le=1)  # share of alt-text captions when captions.weights is {}
    captions: CaptionChoice = field(default_factory=CaptionChoice)
    cfg_dropout: float = num(0.1, ge=0, le=1)
    mixed_precision: Literal["no", "bf16"] = "bf16"
    grad_checkpointing: bool = False
    ema_decay: float | None = num(0.9999, ge=0, le=1)  # None: no EMA copy (the official trainer keeps none)
    snr_gamma: float | None = num(None, gt=0)
    seed: int = num(0, ge=0)


SAMPLE_PROMPTS = (
    "A small cactus with a happy face in the Sahara desert.",
    "A close-up photo of a red fox in the snow, golden hour.",
    "A watercolor painting of a lighthouse on a cliff at sunset.",
    "An astronaut riding a horse on the moon, highly detailed.",
)


@dataclass
class TrainingConfig:
    out: str = "runs"  # RUNDIR parent: runs/<stage>
    checkpoint_every: int = num(500, ge=1)
    keep_checkpoints: int = num(2, ge=1)
    log_every: int = num(10, ge=1)
    sample_every: int = num(1000, ge=0)  # 0: no sample grid
    sample_prompts: list[str] = field(default_factory=lambda: list(SAMPLE_PROMPTS))
    sample_steps: int = num(20, ge=1)
    cfg_scale: float = num(4.5, ge=0)
    num_workers: int = num(2, ge=0)
    stages: dict[str, Stage] = field(default_factory=dict)  # named entries: pipelines.yaml


@dataclass
class JudgeConfig:
    """The VLM judge of `evaluation/judge MODEL EVALDIR` (MODEL is given on the command line)."""

    revision: str | None = None  # a pinned commit; required with trust_remote_code
    trust_remote_code: bool = False  # only on explicit opt-in
    dtype: Literal["float32", "float16", "bfloat16"] = "bfloat16"
    max_new_tokens: int = num(8, ge=1)  # the answer is one word: A, B or tie
    max_pixels: int | None = num(602112, ge=1)  # 768 * 28 * 28 per image (Qwen2.5-VL style cap; two images per prompt)
    resources: Resources = field(default_factory=lambda: Resources(batch_size=8, num_gpus=1.0, num_cpus=4.0))


@dataclass
class RewardModels:
    """Reward models scored beside CLIP and aesthetic by `evaluation/evaluate`; None: not scored."""

    hps_arch: str = "ViT-H-14"  # HPSv2: open_clip ViT-H-14 fine-tuned on human preferences
    hps_weights: str | None = None  # local HPS_v2.1_compressed.pt (or .safetensors)
    hps_config_dir: str | None = None  # extra open_clip model-config JSONs (tiny offline model)
    pickscore: str | None = None  # HF CLIPModel folder or hub id, e.g. yuvalkirstain/PickScore_v1
    pickscore_processor: str | None = None  # its CLIPProcessor; None: the model's own folder


@dataclass
class EvaluationConfig:
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    rewards: RewardModels = field(default_factory=RewardModels)


@dataclass
class Config:
    models: Models = field(default_factory=Models)
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    curation: CurationConfig = field(default_factory=CurationConfig)
    captioning: CaptioningConfig = field(default_factory=CaptioningConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    profile: str | None = None  # set by the loader
    source: str | None = None  # the file it came from


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load(path: str | Path | None = None, profile: str | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read, merge the profile, apply `key=value` overrides, validate. Raises SigmaError."""
    path = Path(path or DEFAULT_CONFIG)
    if not path.is_file():
        raise SigmaError(f"{path}: config file not found")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise SigmaError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise SigmaError(f"{path}: expected a mapping at the top level")
    profiles = raw.pop("profiles", {}) or {}
    if profile is not None:
        if profile not in profiles:
            raise SigmaError(f"profiles.{profile}: no such profile; choose one of {sorted(profiles)}")
        raw = _merge(raw, profiles[profile] or {})
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SigmaError(f"--set {item}: expected key=value")
        _set_path(raw, key.strip().split("."), yaml.safe_load(value))
    cfg: Config = _build(Config, raw, "")
    cfg.profile, cfg.source = profile, str(path)
    _resolve_paths(cfg, path.parent)
    return cfg


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[Hashable] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.YAMLError(f"duplicate key {key!r} at line {key_node.start_mark.line + 1}")
            seen.add(key)
        return super().construct_mapping(node, deep)


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _set_path(raw: dict[str, Any], keys: list[str], value: Any) -> None:
    node = raw
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise SigmaError(f"{'.'.join(keys)}: cannot set inside a non-mapping")
    node[keys[-1]] = value


def _build(tp: Any, value: Any, where: str, default: Any = None) -> Any:
    """Validate `value` against the type `tp`, building dataclasses; `where` is the key path.

    A mapping given for a dataclass fills in the keys it leaves out from `default` (the field's own
    default, e.g. `aesthetic`'s threshold 5.0), else from the class: each default is stated once."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise SigmaError(f"{where or '<top>'}: expected a mapping, got {value!r}")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp) if f.init}
        names = set(fields)
        for k in value:
            if k not in names:
                raise SigmaError(f"{_join(where, k)}: unknown key (known: {', '.join(sorted(names))})")
        start = default if isinstance(default, tp) else tp()
        built = {k: _build(hints[k], v, _join(where, k), getattr(start, k)) for k, v in value.items()}
        for k, v in built.items():
            _check_range(v, fields[k].metadata.get("range", (None, None, None)), _join(where, k))
        return dataclasses.replace(start, **built)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _build(a, value, where, default)
            except SigmaError as e:
                errors.append(e)
        raise errors[0]
    if origin is Literal:
        if value not in args:
            raise SigmaError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise SigmaError(f"{where}: expected a list, got {value!r}")
        return [_build(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise SigmaError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _build(args[1], v, _join(where, str(k))) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float:
        number = _number(value)
        if number is None:
            raise SigmaError(f"{where}: expected float, got {value!r}")
        return float(number)
    if tp is int:
        number = _number(value)
        if number is None or number != int(number):
            raise SigmaError(f"{where}: expected int, got {value!r}")
        return int(number)
    if tp is bool:
        if not isinstance(value, bool):
            raise SigmaError(f"{where}: expected bool, got {value!r}")
        return value
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # YAML reads `256` as a number where a name was meant
        if not isinstance(value, str):
            raise SigmaError(f"{where}: expected str, got {value!r}")
        return value
    raise SigmaError(f"{where}: unsupported type {tp}")


# A number as people write it: `1e-5`, `5e8`, `10_000`, `-2.5`. YAML 1.1 (PyYAML) reads `1e-5` and `5e8`
# as strings (its floats need a dot), so strings of this shape are numbers here, for YAML and --set alike.
_NUMBER = re.compile(r"[+-]?(?:\d(?:_?\d)*(?:\.(?:\d(?:_?\d)*)?)?|\.\d(?:_?\d)*)(?:[eE][+-]?\d+)?")


def _number(value: object) -> int | float | None:
    """`value` as an int or a finite float, or None when it is not a number as written above."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        text = value.strip().replace("_", "")
        value = int(text) if text.lstrip("+-").isdigit() else float(text)
    if isinstance(value, int) or (isinstance(value, float) and math.isfinite(value)):
        return value
    return None


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


_Text = TypeVar("_Text", str, str | None)  # a path setting, required or optional


def _resolve_paths(cfg: Config, base: Path) -> None:
    """Turn relative model paths that exist beside the config file into absolute ones.

    A value that is not a path there stays as written (a hub id such as `google/t5-v1_1-xxl`).
    Files that must exist locally (aesthetic head, NSFW head, watermark) are checked when the
    stage that needs them loads them, so a missing file is reported by the stage that uses it.
    """

    def fix(value: _Text) -> _Text:
        if not value or value.startswith(("/", "~")):
            return value
        candidate = base / value
        if value.startswith(".cache/") and not candidate.exists() and (USER_CACHE / value[7:]).exists():
            return str(USER_CACHE / value[7:])
        return str(candidate.resolve()) if candidate.exists() or value.startswith(("./", ".cache")) else value

    m = cfg.models
    m.t5, m.vae, m.aesthetic_head = fix(m.t5), fix(m.vae), fix(m.aesthetic_head)
    m.nsfw_head, m.watermark, m.dit_weights = fix(m.nsfw_head), fix(m.watermark), fix(m.dit_weights)
    m.clip.config_dir = fix(m.clip.config_dir)
    if m.clip.weights != "openai":
        m.clip.weights = fix(m.clip.weights)
    for cap in cfg.captioning.captioners.values():
        cap.model = fix(cap.model)
    rw = cfg.evaluation.rewards
    rw.hps_weights, rw.hps_config_dir = fix(rw.hps_weights), fix(rw.hps_config_dir)
    rw.pickscore, rw.pickscore_processor = fix(rw.pickscore), fix(rw.pickscore_processor)
    for stage in cfg.training.stages.values():
        stage.data, stage.vae = fix(stage.data), fix(stage.vae)
    cfg.training.out = fix(cfg.training.out) if cfg.training.out.startswith(".") else cfg.training.out


WEIGHT_FILES = (".pth", ".pt", ".bin", ".safetensors")  # what encoders/ can load (torch weights_only / safetensors)


def require_file(path: str | None, key: str, weights: bool = False) -> Path:
    """A config value that must name an existing local file (a PyTorch weights file if `weights`)."""
    if not path:
        raise SigmaError(f"{key}: not set")
    p = Path(path).expanduser()
    if not p.exists():
        raise SigmaError(f"{key}: file not found: {path}")
    if weights and (p.is_dir() or p.suffix not in WEIGHT_FILES):
        raise SigmaError(
            f"{key}: {path}: not a PyTorch weights file (expected {', '.join(WEIGHT_FILES)}; "
            "a Keras/autokeras folder must be converted first, see curation/README.md)"
        )
    return p
