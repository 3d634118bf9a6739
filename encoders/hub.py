"""Where a model comes from, checked before anything loads it: a local path, or a Hugging Face hub id.

Every loader of encoders/ (and the stages that load a model of their own) calls `require(ref, key)`
first, and entry points call it for every model they will use before Ray or any model starts. The
rule, in one place:

- a local path that exists: as is; a path that does not (`/`, `~`, `.`, or a file name with a suffix):
  one line naming the key;
- a hub id in the local cache (the revision asked for, `main` by default): loads from there; when the
  hub cannot be reached this process (and the Ray workers it starts) turn `HF_HUB_OFFLINE` on, so the
  client reads the cache instead of retrying the hub;
- a hub id not in the cache: the hub is probed once per process (a HEAD of its endpoint, 5 s, no
  retries); reachable, the model downloads as it always did; not reachable (or `HF_HUB_OFFLINE` set),
  one line naming the model, the key and the ways out. Without the probe, the hub client retries for
  about a minute and ends in a traceback (`OSError: We couldn't connect to 'https://huggingface.co'`);
- a bucket URL (`s3://bucket/models/t5`, a folder or one weights file): copied once into the models
  cache (`storage.cache.models`, shards/cache.py `copy_once`: a second load lists the folder and
  copies nothing when sizes and ETags match; a half copy is never used) and loaded from there.
  `require` returns that local folder: loaders load what it returns. Entry points call
  `configure(cfg.storage)`; unconfigured (a Ray worker), the default folder and the environment's
  endpoint are used.
"""

from __future__ import annotations

import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from shards import cache, storage
from shards.errors import SigmaError

PROBE_TIMEOUT = 5.0  # seconds: a reachable hub answers a HEAD in well under one
WAYS_OUT = (
    "give a local path (--set {key}=/models/...), use --profile demo (tiny offline models), or fill the "
    "Hugging Face cache where the hub is reachable and run with HF_HUB_OFFLINE=1"
)
_probed: dict[str, str | None] = {}  # endpoint -> None (reachable) or why not
_bucket_models: dict[str, Any] = {"folder": None, "options": None}  # configure()
_BUCKET_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".json", ".npz")


def is_path(ref: str) -> bool:
    """Whether `ref` is meant as a local path, not a hub id (`owner/name`, e.g. `google/t5-v1_1-xxl`)."""
    return (
        ref.startswith(("/", "~", "."))
        or ref.strip("/").count("/") > 1
        or Path(ref).suffix.lower() in FILE_SUFFIXES
        or "/" not in ref.strip("/")
        and bool(Path(ref).suffix)
    )


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def cached(repo: str, revision: str | None = None) -> bool:
    """Whether the local Hugging Face cache holds a snapshot of `repo` at `revision` (a commit, or a
    branch/tag the cache recorded; default `main`). Reads the cache folder only: no network."""
    from huggingface_hub import constants

    folder = Path(constants.HF_HUB_CACHE) / ("models--" + repo.strip("/").replace("/", "--"))
    revision = revision or "main"
    if not re.fullmatch(r"[0-9a-f]{40}", revision):
        ref = folder / "refs" / revision
        if not ref.is_file():
            return False
        revision = ref.read_text().strip()
    snapshot = folder / "snapshots" / revision
    return snapshot.is_dir() and any(snapshot.iterdir())


def unreachable() -> str | None:
    """Why the hub cannot be reached (None if it can): one HEAD of its endpoint, remembered per process.
    Any HTTP answer counts as reachable; a refused connection, a DNS failure or a timeout does not."""
    url = endpoint()
    if url not in _probed:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=PROBE_TIMEOUT).close()
            _probed[url] = None
        except urllib.error.HTTPError:
            _probed[url] = None  # it answered
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            _probed[url] = f"{url} unreachable ({str(reason).splitlines()[0][:120] or type(reason).__name__})"
    return _probed[url]


def go_offline() -> None:
    """Read the cache without asking the hub, in this process and the Ray workers it starts (a local
    cluster inherits the environment; a joined one gets it as env_vars, common/ray_start.py)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = True  # read when the client is called, so it applies from here on
    except ImportError:
        pass


def available(ref: str | None, revision: str | None = None) -> bool:
    """Whether `ref` is on this machine: an existing path, or a hub id in the local cache (no network)."""
    if not ref:
        return False
    if Path(ref).expanduser().exists():
        return True
    return not is_path(ref) and cached(ref, revision)


def configure(storage_cfg: Any) -> None:
    """Where model folders given as bucket URLs are copied (`storage.cache.models`) and how the store is
    reached (the `storage` config section); each entry point calls it once after loading the config."""
    _bucket_models["folder"] = storage_cfg.cache.models_folder
    _bucket_models["options"] = storage_cfg


def in_bucket(ref: str | None) -> bool:
    """Whether `ref` is a bucket URL (s3://, gs://, az://)."""
    m = _BUCKET_URL.match(ref or "")
    return m is not None and m.group(1).lower() in storage.BACKENDS


def local_copy(ref: str, key: str) -> str:
    """The local copy of a model folder or weights file in a bucket (made once, see above)."""
    try:
        loc = storage.resolve(ref, _bucket_models["options"])
        return str(cache.copy_once(loc, Path(_bucket_models["folder"] or cache.MODELS)))
    except SigmaError as e:
        raise SigmaError(f"{key}: {e}") from None


def require(ref: str | None, key: str, revision: str | None = None, what: str = "model") -> str:
    """Check that the model `key` names can be loaded from where it is, in one line if not (see above).
    Returns what to load: `ref` itself, or for a bucket URL its local copy."""
    if not ref:
        raise SigmaError(f"{key}: not set (a local folder or a hub id)")
    if in_bucket(ref):
        return local_copy(ref, key)
    if Path(ref).expanduser().exists():
        return ref
    if is_path(ref):
        raise SigmaError(f"{key}: file not found: {ref}")
    name = f"{key}: {what} {ref}" + (f" (revision {revision})" if revision else "")
    if cached(ref, revision):
        if not offline() and unreachable():
            go_offline()
        return ref
    why = "HF_HUB_OFFLINE is set" if offline() else unreachable()
    if why:
        way = WAYS_OUT.format(key=key)
        if key.startswith("--"):  # a flag, not a config key: the local path goes there
            way = way.replace(f"--set {key}=/models/...", f"{key} /models/...")
        raise SigmaError(f"{name}: not in the local Hugging Face cache and {why}; {way}")
    return ref


def require_clip(arch: str, weights: str | None, key: str = "models.clip.weights") -> None:
    """An open_clip model's weights: a local file (checked as a path) or a pretrained tag, whose files
    open_clip fetches from the hub repo its table names (`openai` of ViT-L-14-quickgelu:
    timm/vit_large_patch14_clip_224.openai)."""
    if not weights:
        return  # random weights (the tiny model's config alone)
    if Path(weights).expanduser().exists() or is_path(weights):
        return require(weights, key)
    import open_clip

    cfg = open_clip.get_pretrained_cfg(arch, weights)
    if not cfg:
        raise SigmaError(f"{key}: {weights!r} is neither a file nor an open_clip pretrained tag of {arch}")
    if cfg.get("hf_hub"):
        repo = "/".join(cfg["hf_hub"].strip("/").split("/")[:2])
        require(repo, key, what=f"open_clip {arch} '{weights}' weights, hub repo")
