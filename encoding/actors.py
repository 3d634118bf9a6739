"""The per-sample stages of `encoding/encode` (Ray tasks and actors); the driver is encoding/encode.py.

    read_shard (tasks)  ->  T5Stage (actors)  ->  preprocess (tasks)  ->  VAEStage (actors)

Each row carries `status`/`reason`; a stage passes failed rows through untouched. Pixels travel
as uint8 bytes and tensors as safetensors bytes, so every column is a plain Arrow scalar.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from encoding import clipscore, sets
from shards import buckets, captions, curated, encoded, reasons, storage
from shards import format as fmt
from shards.errors import SigmaError

KEPT, REJECTED, FAILED = reasons.KEPT, reasons.REJECTED, reasons.FAILED
READ_CPUS = 0.5  # CPU share of a read or preprocess task

# Every row has these columns (Ray Data needs one schema); stages fill them in.
ROW = dict(
    key="",
    source="",
    status=KEPT,
    reason="",
    width=0,
    height=0,
    captions="{}",  # JSON {set: caption} (encoding/sets.py)
    tar="",  # adding sets to a committed tar: its path in ENCDIR ("" for a new sample)
    image=b"",
    bucket="",
    bucket_h=0,
    bucket_w=0,
    resized_h=0,
    resized_w=0,
    crop="",
    pixels=b"",
    t5=b"",  # safetensors {set: [n, C] fp16}
    t5_lens="{}",  # JSON {set: n}
    clip="{}",  # JSON {set: CLIP-Score}
    clip_image=b"",  # the image's CLIP embedding, L2-normalised fp16 (curation's, else made at encode)
    vae=b"",
)


def _row(**kw) -> dict:
    return {**ROW, **kw}


def _loc(p) -> storage.Loc:
    """A task's path: the driver hands Locs (disk or bucket); a plain local path is taken too."""
    return p if isinstance(p, storage.Loc) else storage.resolve(p)


# ---------------------------------------------------------------------------------------------
# Stage 1: read one curated shard (task) -> one row per sample
# ---------------------------------------------------------------------------------------------


def set_row(key: str, source: str, texts: dict[str, str], tar: str, clip_image: bytes = b"") -> dict:
    """A row that only needs T5 (adding caption sets to a committed tar)."""
    status = KEPT if texts else FAILED
    return _row(key=key, source=source, captions=json.dumps(texts), tar=tar, status=status, clip_image=clip_image)


def caption_rows(path) -> dict[str, dict]:
    """{key: caption row} from the shard's caption file (a CAPDIR's, or a caption table's part for this
    shard: encoding/caption_table.py); empty when the file is missing or unreadable (missing_caption)."""
    path = _loc(path)  # a file on disk or an object in a bucket
    if not path.has_file():
        print(f"encode: {path}: no caption file; its samples are reported as missing_caption", flush=True)
        return {}
    try:
        return {r["key"]: r for r in captions.read_file(path).to_dict("records")}
    except SigmaError as e:
        print(f"encode: {e}; its samples are reported as missing_caption", flush=True)
        return {}


def read_shard(task: dict, tier: str):
    """Rows for every sample of one curated shard, minus those already encoded (`task["done"]`)."""
    shard = _loc(task["shard"])
    source, done = shard.name, set(task["done"])
    tables = {name: caption_rows(path) for name, path in task["captions"].items()}
    try:
        keys = curated.keys(shard)  # the whole tar is checked before any row is made
    except curated.CorruptShard as e:
        print(f"encode: {e}; skipped", flush=True)
        for k in sorted((set().union(*tables.values()) | set(e.keys)) - done):
            yield _row(key=k, source=source, status=FAILED, reason=reasons.CORRUPT_SHARD)
        return
    embeddings = clipscore.lookup(task.get("clip_index") or [], [k for k in keys if k not in done])
    for key, members in curated.samples(shard):
        if key not in done:
            row = _sample_row(key, members, {n: t.get(key) for n, t in tables.items()}, task["derived"], source, tier)
            yield {**row, "clip_image": embeddings.get(key, b"")}


def _sample_row(
    key: str, members: dict[str, bytes], rows: dict[str, dict | None], derived: dict[str, str], source: str, tier: str
) -> dict:
    image = next((members[e] for e in fmt.IMAGE_EXTS if e in members), None)
    if image is None:
        return _row(key=key, source=source, status=FAILED, reason=reasons.NOT_AN_IMAGE)
    try:
        meta = json.loads(members.get(fmt.META_EXT) or b"{}")
        width, height = int(meta.get("width") or 0), int(meta.get("height") or 0)
    except (ValueError, TypeError, AttributeError):  # unusable metadata: the decoded size decides
        width = height = 0
    base = dict(key=key, source=source, width=width, height=height)
    # The tier rule on the recorded size first: skips decoding images that cannot qualify.
    if width and height and not buckets.qualifies(height, width, tier):
        return _row(**base, status=REJECTED, reason=reasons.NOT_IN_TIER)
    alt = members.get(fmt.CAPTION_EXT, b"").decode("utf-8", "replace")
    texts, failure = sets.sample_captions(rows, alt, derived)
    if not texts:
        return _row(**base, status=FAILED, reason=failure)
    return _row(**base, captions=json.dumps(texts), image=image)


def read_for_sets(task: dict[str, Any]):
    """Ray flat_map: one row per key of a committed tar, in its order, with the captions of the sets to add
    ({} where the sample has none: a null row in the side file). Reads caption files only."""
    tables: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for name, files in task["captions"].items():
        tables[name] = {source: caption_rows(path) for source, path in files.items()}
    import pyarrow.parquet as pq

    kept: dict[str, bytes] = {}  # embeddings kept in the tar's row file (images from outside curation)
    with _loc(task["rows"]).open("rb") as f:
        rows = pq.ParquetFile(f)
        if "clip_embedding" in rows.schema_arrow.names:
            t = rows.read(columns=["key", "clip_embedding"])
            kept = {k: e for k, e in zip(t["key"].to_pylist(), t["clip_embedding"].to_pylist()) if e}
    embeddings = {**clipscore.lookup(task.get("clip_index") or [], task["keys"]), **kept}
    for key, source in zip(task["keys"], task["sources"]):
        texts: dict[str, str] = {}
        for name in task["captions"]:
            row = tables[name][source].get(key)
            if row is not None and row.get("status") == reasons.KEPT and (row.get("caption") or "").strip():
                texts[name] = row["caption"].strip()
        for name, src in task["derived"].items():
            if src in texts:
                texts[name] = sets.first_sentence(texts[src])
        texts = {n: t for n, t in texts.items() if n in task["sets"]}
        yield set_row(key, source, texts, task["tar"], embeddings.get(key, b""))


# ---------------------------------------------------------------------------------------------
# Stage 2: T5 features (actor)
# ---------------------------------------------------------------------------------------------


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _ok(batch: dict) -> list[int]:
    return [i for i, s in enumerate(batch["status"]) if s == KEPT]


def _fail(batch: dict, i: int, reason: str) -> None:
    batch["status"][i], batch["reason"][i] = FAILED, reason
    batch["image"][i] = batch["pixels"][i] = b""


class T5Stage:
    """Caption features of every caption set of a sample: valid tokens only, fp16, as safetensors bytes;
    with `clip` (models.clip: arch, weights, config_dir) also each caption's CLIP-Score (encoding/clipscore.py)."""

    def __init__(self, model: str, dtype: str, max_length: int, batch_size: int = 32, clip: dict | None = None):
        from encoders import t5

        self.t5, self.max_length, self.batch_size = t5, max_length, batch_size
        self.tokenizer = t5.load_tokenizer(model)
        self.encoder = t5.load_t5(model, dtype, _device())
        self.clip = clipscore.CaptionClipScore(**clip, device=_device()) if clip else None

    def __call__(self, batch: dict) -> dict:
        batch = {k: list(v) for k, v in batch.items()}
        items = [(i, name, text) for i in _ok(batch) for name, text in json.loads(batch["captions"][i]).items()]
        texts = [text for _, _, text in items]
        feats, lengths = (
            self.t5.encode_captions(self.tokenizer, self.encoder, texts, self.max_length, batch_size=self.batch_size)
            if texts
            else ([], [])
        )
        groups: dict[int, dict] = {}
        for (i, name, _), f, n in zip(items, feats, lengths):
            groups.setdefault(i, {})[name] = (f, n)
        for i, group in groups.items():
            data = encoded.pack_t5({name: f for name, (f, _) in group.items()})
            if not encoded.all_finite(data):
                _fail(batch, i, reasons.NON_FINITE)
                continue
            batch["t5"][i] = data
            batch["t5_lens"][i] = json.dumps({name: int(n) for name, (_, n) in group.items()})
        if self.clip is not None:
            self._clip_scores(batch, [(i, n, t) for i, n, t in items if batch["status"][i] == KEPT])
        return _columns(batch)

    def _clip_scores(self, batch: dict, items: list[tuple[int, str, str]]) -> None:
        """CLIP-Scores of the captions of kept rows; an image without an embedding is embedded from its bytes."""
        assert self.clip is not None
        todo = sorted({i for i, _, _ in items if not batch["clip_image"][i] and batch["image"][i]})
        for i, emb in zip(todo, self.clip.image_embeddings([batch["image"][i] for i in todo])):
            batch["clip_image"][i] = emb.tobytes() if emb is not None else b""
        scored = [(i, n, t) for i, n, t in items if batch["clip_image"][i]]
        embs = [np.frombuffer(batch["clip_image"][i], np.float16) for i, _, _ in scored]
        scores: dict[int, dict[str, float]] = {}
        for (i, name, _), score in zip(scored, self.clip.scores(embs, [t for _, _, t in scored])):
            scores.setdefault(i, {})[name] = round(float(score), 4)
        for i, got in scores.items():
            batch["clip"][i] = json.dumps(got)


def _columns(batch: dict) -> dict:
    """Lists back to numpy columns (bytes as object arrays, so Ray keeps them as binary)."""
    out = {}
    for k, v in batch.items():
        out[k] = np.array(v, dtype=object) if isinstance(ROW[k], (bytes, str)) else np.asarray(v, dtype=np.int64)
    return out


# ---------------------------------------------------------------------------------------------
# Stage 3: decode, tier rule on the real size, resize + center-crop to the bucket (task)
# ---------------------------------------------------------------------------------------------


def preprocess(batch: dict, tier: str, max_pixels: int) -> dict:
    from PIL import Image

    from encoders import vae

    Image.MAX_IMAGE_PIXELS = max_pixels
    batch = {k: list(v) for k, v in batch.items()}
    for i in _ok(batch):
        try:
            img = vae.open_image(batch["image"][i])
        except Image.DecompressionBombError:
            _fail(batch, i, reasons.DECOMPRESSION_BOMB)
            continue
        except (OSError, ValueError, SyntaxError):
            _fail(batch, i, reasons.NOT_AN_IMAGE)
            continue
        w, h = img.size
        batch["width"][i], batch["height"][i], batch["image"][i] = w, h, b""
        if not buckets.qualifies(h, w, tier):
            batch["status"][i], batch["reason"][i] = REJECTED, reasons.NOT_IN_TIER
            continue
        key, (bh, bw) = buckets.nearest_bucket(h, w, buckets.TIER_TABLES[tier])
        cropped, box = vae.resize_and_crop(img, (bh, bw))
        batch["bucket"][i], batch["bucket_h"][i], batch["bucket_w"][i] = key, bh, bw
        batch["resized_h"][i], batch["resized_w"][i] = vae.resized_size(h, w, (bh, bw))
        batch["crop"][i] = json.dumps(list(box))
        batch["pixels"][i] = np.asarray(cropped, dtype=np.uint8).tobytes()  # [bh, bw, 3]
    return _columns(batch)


# ---------------------------------------------------------------------------------------------
# Stage 4: VAE latent distribution (actor)
# ---------------------------------------------------------------------------------------------


class VAEStage:
    """Latent mean and std at the bucket size, fp16, as safetensors bytes; NaN/Inf -> failed."""

    def __init__(self, model: str, dtype: str, tiling: bool, slicing: bool):
        from encoders import vae

        self.vae_mod = vae
        self.vae = vae.load_vae(model, dtype, _device(), tiling=tiling, slicing=slicing)
        self.scaling = vae.scaling_factor(self.vae)

    def __call__(self, batch: dict) -> dict:
        batch = {k: list(v) for k, v in batch.items()}
        groups: dict[tuple[int, int], list[int]] = {}
        for i in _ok(batch):
            groups.setdefault((batch["bucket_h"][i], batch["bucket_w"][i]), []).append(i)
        for (bh, bw), rows in groups.items():
            pixels = np.stack(
                [np.frombuffer(batch["pixels"][i], np.uint8).reshape(bh, bw, 3) for i in rows]
            )  # [b, H, W, 3]
            x = self.vae_mod.to_pixels(pixels)  # [b, 3, H, W] in [-1, 1]: the tested preprocessing, not a copy
            try:
                mean, std = self.vae_mod.encode_latent_dist(self.vae, x)  # [b, 4, H/8, W/8] each
            except RuntimeError as e:  # e.g. out of memory on a huge bucket: that batch fails, the run goes on
                print(f"encode: VAE failed on {len(rows)} samples at {bh}x{bw}: {e}", flush=True)
                for i in rows:
                    _fail(batch, i, reasons.ENCODE_ERROR)
                continue
            for j, i in enumerate(rows):
                data = encoded.pack_vae(mean[j], std[j], self.scaling)
                batch["pixels"][i] = b""
                if not encoded.all_finite(data):
                    _fail(batch, i, reasons.NON_FINITE)
                    continue
                batch["vae"][i] = data
        return _columns(batch)


def null_caption(model: str, dtype: str, max_length: int) -> bytes:
    """T5 encoding of "" padded to max_length ([L, C] fp32), for the DiT's `y_embedding`."""
    from safetensors.torch import save

    from encoders import t5

    tokenizer, encoder = t5.load_tokenizer(model), t5.load_t5(model, dtype, _device())
    return save({"y_embedding": t5.null_caption_embedding(tokenizer, encoder, max_length).contiguous()})
