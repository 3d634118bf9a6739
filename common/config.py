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
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from shards.errors import SigmaError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "pipelines.yaml"
# `.cache/...` paths missing beside the config file are looked up here: a `ray job submit --working-dir .`
# uploads the checkout without its git-ignored .cache/, and demo/tiny_models.py mirrors the tiny models here.
USER_CACHE = Path(os.environ.get("SIGMAFORGE_CACHE") or Path.home() / ".cache" / "sigmaforge")


def num(default, ge=None, gt=None, le=None):
    """A numeric field with its valid range (checked once, at load): `timeout: int = num(10, ge=1)`."""
    return field(default=default, metadata={"range": (ge, gt, le)})


def _check_range(value, bounds, where: str) -> None:
    ge, gt, le = bounds
    if isinstance(value, list):
        for i, v in enumerate(value):
            _check_range(v, bounds, f"{where}[{i}]")
        return
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if (ge is not None and value < ge) or (gt is not None and value <= gt) or (le is not None and value > le):
        want = [f">= {ge}" if ge is not None else "", f"> {gt}" if gt is not None else "",
                f"<= {le}" if le is not None else ""]
        raise SigmaError(f"{where}: {value!r} is out of range (expected {' and '.join(w for w in want if w)})")


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


@dataclass
class RayConfig:
    address: Optional[str] = None  # None: join the cluster `ray job submit` set up, else start a local one
    num_cpus: Optional[int] = num(None, ge=1)  # only for a local cluster


@dataclass
class ClipModel:
    arch: str = "ViT-L-14-quickgelu"  # LAION heads were trained on OpenAI L/14 (QuickGELU) embeddings
    weights: str = "openai"  # open_clip pretrained tag, or a local weights file
    config_dir: Optional[str] = None  # folder of extra open_clip model-config JSONs (tiny offline models)


@dataclass
class Models:
    clip: ClipModel = field(default_factory=ClipModel)
    aesthetic_head: str = "sac+logos+ava1-l14-linearMSE.pth"
    nsfw_head: Optional[str] = None  # LAION clip-autokeras-binary-nsfw weights, local
    watermark: Optional[str] = None  # LAION watermark detector weights (timm efficientnet_b3a), local
    t5: str = "google/t5-v1_1-xxl"  # T5 encoder folder or hub id (tokenizer in the same place)
    vae: str = "stabilityai/sdxl-vae"  # diffusers AutoencoderKL folder or hub id
    dit: str = "XL/2"  # a named size in training/model.py
    dit_weights: Optional[str] = None  # PixArt-Sigma checkpoint to start from (.pth / .safetensors / diffusers dir)


@dataclass
class Resources:
    """How a Ray actor pool is sized."""

    batch_size: int = num(16, ge=1)
    num_gpus: float = num(0.0, ge=0)
    num_cpus: float = num(1.0, ge=0)
    concurrency: int = num(1, ge=1)


@dataclass
class DownloadConfig:
    processes: int = num(2, ge=1)  # download shards in flight at once (Ray tasks, one img2dataset Downloader each)
    threads: int = num(16, ge=1)  # requests in flight per shard
    num_cpus: float = num(0.25, ge=0)  # Ray CPUs per download task: I/O-bound; decoding is in its own 1-CPU tasks
    timeout: int = num(10, ge=1)  # seconds per network operation (connect, one read)
    max_seconds: float = num(30.0, gt=0)  # total per request (connect + headers + body) -> `timeout`
    max_bytes: int = num(64 * 2**20, ge=1)  # per body -> `too_large`; a 4K (3840x2160) RGBA PNG is <= 33 MB uncompressed
    retries: int = num(1, ge=0)
    max_retry_after: float = num(60.0, ge=0)  # longest Retry-After (429/503) waited for; beyond: http_429 / http_503
    shard_size: int = num(1000, ge=1)  # URLs per img2dataset shard: the unit of work and of resumption
    per_domain_limit: int = num(4, ge=1, le=256)  # requests in flight per host from all download processes of a node (<= curation.hosts.MAX_LIMIT)
    allow_networks: list[str] = field(default_factory=list)  # CIDRs allowed besides the global internet
    robots_txt: bool = True  # read each origin's robots.txt and honour it for our user-agent token
    contact: Optional[str] = None  # URL (or mailto:) in the user agent, where a site owner reaches the operator
    user_agent_token: Optional[str] = "sigmaforge"
    disallowed_header_directives: list[str] = field(
        default_factory=lambda: ["noai", "noimageai", "none", "noindex", "noimageindex"]
    )

    def __post_init__(self):  # the numbers' ranges are checked at load (num); these are formats
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
    threshold: float = num(0.5, ge=0, le=10)  # aesthetic: a 1..10 score; NSFW, watermark: 0..1


@dataclass
class DedupConfig:
    enabled: bool = True
    phash_radius: int = num(4, ge=0, le=64)  # Hamming distance on a 64-bit perceptual hash
    clip_similarity: Optional[float] = num(0.96, ge=-1, le=1)  # cosine similarity on CLIP embeddings; None: off
    cluster_size: int = num(2_000, ge=1)  # mean embeddings per k-means cluster (semantic dedup compares inside one)
    probe: int = num(2, ge=1)  # nearest clusters each embedding joins (recall at cluster borders)
    max_group: int = num(50_000, ge=1)  # distinct pHashes compared all pairs in one band group; beyond: windows


@dataclass
class CurationConfig:
    download: DownloadConfig = field(default_factory=DownloadConfig)
    min_tier: Literal["1k", "2k", "4k"] = "1k"
    max_pixels: int = num(64_000_000, ge=1)  # decompression-bomb guard, well above 4K (3840x2160 = 8.3 MP)
    measure_seconds: float = num(60.0, gt=0)  # deadline per image decode -> `timeout` (a 64 MP PNG decodes in a few s)
    quality: QualityConfig = field(default_factory=QualityConfig)
    aesthetic: ThresholdFilter = field(default_factory=lambda: ThresholdFilter(True, 5.0))
    aesthetic_resources: Resources = field(default_factory=Resources)
    nsfw: ThresholdFilter = field(default_factory=lambda: ThresholdFilter(False, 0.5))
    watermark: ThresholdFilter = field(default_factory=lambda: ThresholdFilter(False, 0.8))
    dedup: DedupConfig = field(default_factory=DedupConfig)
    shard_size: int = num(1000, ge=1)  # kept images per output shard


@dataclass
class Captioner:
    backend: Literal["hf", "share-captioner"] = "hf"
    model: str = ""  # local folder or hub id
    revision: Optional[str] = None
    trust_remote_code: bool = False  # only on explicit opt-in
    dtype: Literal["float32", "float16", "bfloat16"] = "bfloat16"
    prompt: str = "Describe this image in detail."
    max_new_tokens: int = num(300, ge=1)
    generate: dict[str, Any] = field(default_factory=dict)  # extra generate() kwargs
    max_pixels: Optional[int] = num(None, ge=1)  # Qwen2.5-VL style cap for 4K inputs
    runtime_env: dict[str, Any] = field(default_factory=dict)  # Ray runtime_env for this backend's actors
    resources: Resources = field(default_factory=lambda: Resources(batch_size=8))


@dataclass
class CaptioningConfig:
    captioner: str = "share-captioner"  # a key of `captioners`
    captioners: dict[str, Captioner] = field(default_factory=dict)
    strip_openings: bool = True  # drop "The image shows ..." style openings
    token_budget: int = num(300, ge=1)  # T5 tokens PixArt-Sigma keeps


@dataclass
class EncodeConfig:
    t5_max_length: int = num(300, ge=1)
    t5_dtype: Literal["float32", "float16", "bfloat16"] = "bfloat16"
    vae_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # SDXL VAE overflows in fp16
    vae_tiling: bool = False  # for 2K/4K on small GPUs; tiles can show faint seams in latents
    vae_slicing: bool = False
    shard_bytes: int = num(1_000_000_000, ge=1)
    t5_resources: Resources = field(default_factory=lambda: Resources(batch_size=32))
    vae_resources: Resources = field(default_factory=lambda: Resources(batch_size=4))


@dataclass
class Stage:
    parent: Optional[str] = None  # stage whose output this one starts from
    data: Optional[str] = None  # ENCDIR; default from --data
    tier: str = "1k"  # which encoded tier (bucket table) it trains on
    vae: Optional[str] = None  # latents must come from this VAE; None: models.vae
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
    steps: int = num(1000, ge=1)
    real_prompt_ratio: float = num(0.5, ge=0, le=1)
    cfg_dropout: float = num(0.1, ge=0, le=1)
    mixed_precision: Literal["no", "bf16"] = "bf16"
    grad_checkpointing: bool = False
    ema_decay: Optional[float] = num(0.9999, ge=0, le=1)  # None: no EMA copy (the official trainer keeps none)
    snr_gamma: Optional[float] = num(None, gt=0)
    seed: int = num(0, ge=0)


@dataclass
class TrainingConfig:
    out: str = "runs"  # RUNDIR parent: runs/<stage>
    checkpoint_every: int = num(500, ge=1)
    keep_checkpoints: int = num(2, ge=1)
    log_every: int = num(10, ge=1)
    sample_every: int = num(500, ge=0)  # 0: no sample grid
    sample_prompts: list[str] = field(default_factory=list)
    sample_steps: int = num(20, ge=1)
    cfg_scale: float = num(4.5, ge=0)
    num_workers: int = num(2, ge=0)
    stages: dict[str, Stage] = field(default_factory=dict)


@dataclass
class JudgeConfig:
    """The VLM judge of `evaluation/judge MODEL EVALDIR` (MODEL is given on the command line)."""

    revision: Optional[str] = None  # a pinned commit; required with trust_remote_code
    trust_remote_code: bool = False  # only on explicit opt-in
    dtype: Literal["float32", "float16", "bfloat16"] = "bfloat16"
    max_new_tokens: int = num(8, ge=1)  # the answer is one word: A, B or tie
    max_pixels: Optional[int] = num(602112, ge=1)  # 768 * 28 * 28 per image (Qwen2.5-VL style cap; two images per prompt)
    resources: Resources = field(default_factory=lambda: Resources(batch_size=8, num_gpus=1.0, num_cpus=4.0))


@dataclass
class RewardModels:
    """Reward models scored beside CLIP and aesthetic by `evaluation/evaluate`; None: not scored."""

    hps_arch: str = "ViT-H-14"  # HPSv2: open_clip ViT-H-14 fine-tuned on human preferences
    hps_weights: Optional[str] = None  # local HPS_v2.1_compressed.pt (or .safetensors)
    hps_config_dir: Optional[str] = None  # extra open_clip model-config JSONs (tiny offline model)
    pickscore: Optional[str] = None  # HF CLIPModel folder or hub id, e.g. yuvalkirstain/PickScore_v1
    pickscore_processor: Optional[str] = None  # its CLIPProcessor; None: the model's own folder


@dataclass
class EvaluationConfig:
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    rewards: RewardModels = field(default_factory=RewardModels)


@dataclass
class Config:
    models: Models = field(default_factory=Models)
    ray: RayConfig = field(default_factory=RayConfig)
    curation: CurationConfig = field(default_factory=CurationConfig)
    captioning: CaptioningConfig = field(default_factory=CaptioningConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    profile: Optional[str] = None  # set by the loader
    source: Optional[str] = None  # the file it came from


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load(path: str | Path | None = None, profile: str | None = None, overrides: list[str] = ()) -> Config:
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
    cfg = _build(Config, raw, "")
    cfg.profile, cfg.source = profile, str(path)
    _resolve_paths(cfg, path.parent)
    return cfg


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.YAMLError(f"duplicate key {key!r} at line {key_node.start_mark.line + 1}")
            seen.add(key)
        return super().construct_mapping(node, deep)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _set_path(raw: dict, keys: list[str], value: Any) -> None:
    node = raw
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise SigmaError(f"{'.'.join(keys)}: cannot set inside a non-mapping")
    node[keys[-1]] = value


def _build(tp: Any, value: Any, where: str) -> Any:
    """Validate `value` against the type `tp`, building dataclasses; `where` is the key path."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
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
        built = {k: _build(hints[k], v, _join(where, k)) for k, v in value.items()}
        for k, v in built.items():
            _check_range(v, fields[k].metadata.get("range", (None, None, None)), _join(where, k))
        return tp(**built)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _build(a, value, where)
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
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SigmaError(f"{where}: expected float, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SigmaError(f"{where}: expected int, got {value!r}")
        return value
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


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _resolve_paths(cfg: Config, base: Path) -> None:
    """Turn relative model paths that exist beside the config file into absolute ones.

    A value that is not a path there stays as written (a hub id such as `google/t5-v1_1-xxl`).
    Files that must exist locally (aesthetic head, NSFW head, watermark) are checked when the
    stage that needs them loads them, so a missing file is reported by the stage that uses it.
    """

    def fix(value: str | None) -> str | None:
        if value is None or value.startswith(("/", "~")):
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
        raise SigmaError(f"{key}: {path}: not a PyTorch weights file (expected {', '.join(WEIGHT_FILES)}; "
                         "a Keras/autokeras folder must be converted first, see curation/README.md)")
    return p
