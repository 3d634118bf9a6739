"""The per-sample stages of `encoding/encode` (Ray tasks and actors); the driver is encoding/encode.py.

    read_shard (tasks)  ->  T5Stage (actors)  ->  preprocess (tasks)  ->  VAEStage (actors)

Each row carries `status`/`reason`; a stage passes failed rows through untouched. Pixels travel
as uint8 bytes and tensors as safetensors bytes, so every column is a plain Arrow scalar.
"""

from __future__ import annotations

import json

import numpy as np

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
    recaption="",
    original="",
    image=b"",
    bucket="",
    bucket_h=0,
    bucket_w=0,
    resized_h=0,
    resized_w=0,
    crop="",
    pixels=b"",
    t5=b"",
    t5_len_recaption=0,
    t5_len_original=0,
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


def _captions(task: dict) -> dict[str, dict]:
    """{key: caption row} from the shard's caption file (a CAPDIR's, or a caption table's part for this
    shard: encoding/caption_table.py); empty when the file is missing or unreadable (missing_caption)."""
    path = _loc(task["captions"])  # a file on disk or an object in a bucket
    if not path.exists():
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
    rows = _captions(task)
    try:
        curated.keys(shard)  # the whole tar is checked before any row is made
    except curated.CorruptShard as e:
        print(f"encode: {e}; skipped", flush=True)
        for k in sorted((set(rows) | set(e.keys)) - done):
            yield _row(key=k, source=source, status=FAILED, reason=reasons.CORRUPT_SHARD)
        return
    for key, members in curated.samples(shard):
        if key not in done:
            yield _sample_row(key, members, rows.get(key), source, tier)


def _sample_row(key: str, members: dict[str, bytes], caption: dict | None, source: str, tier: str) -> dict:
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
    if caption is None:  # reported, never guessed from the original caption
        return _row(**base, status=FAILED, reason=reasons.MISSING_CAPTION)
    if caption.get("status") != KEPT:
        reason = caption.get("reason") or ""
        return _row(**base, status=FAILED, reason=reason if reasons.is_reason(reason) else reasons.CAPTION_ERROR)
    text = (caption.get("caption") or "").strip()
    if not text:
        return _row(**base, status=FAILED, reason=reasons.EMPTY_CAPTION)
    original = caption.get("original_caption")
    if original is None:
        original = members.get(fmt.CAPTION_EXT, b"").decode("utf-8", "replace")
    return _row(**base, recaption=text, original=original.strip(), image=image)


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
    """Caption features of both captions: valid tokens only, fp16, as safetensors bytes."""

    def __init__(self, model: str, dtype: str, max_length: int, batch_size: int = 32):
        from encoders import t5

        self.t5, self.max_length, self.batch_size = t5, max_length, batch_size
        self.tokenizer = t5.load_tokenizer(model)
        self.encoder = t5.load_t5(model, dtype, _device())

    def __call__(self, batch: dict) -> dict:
        batch = {k: list(v) for k, v in batch.items()}
        ok = _ok(batch)
        texts = [batch["recaption"][i] for i in ok] + [batch["original"][i] for i in ok if batch["original"][i]]
        feats, lengths = (
            self.t5.encode_captions(self.tokenizer, self.encoder, texts, self.max_length, batch_size=self.batch_size)
            if texts
            else ([], [])
        )
        originals = iter(range(len(ok), len(texts)))
        for j, i in enumerate(ok):
            group = {"recaption": feats[j]}
            batch["t5_len_recaption"][i] = lengths[j]
            if batch["original"][i]:
                o = next(originals)
                group["original"], batch["t5_len_original"][i] = feats[o], lengths[o]
            data = encoded.pack_t5(group)
            if not encoded.all_finite(data):
                _fail(batch, i, reasons.NON_FINITE)
                continue
            batch["t5"][i] = data
        return _columns(batch)


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
