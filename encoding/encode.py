"""`encoding/encode`: curated shards + captions -> bucketed training shards, as a Ray Data pipeline.

    read_shard (tasks)  ->  T5Stage (actors)  ->  preprocess (tasks)  ->  VAEStage (actors)  ->  driver writes

Each row carries `status`/`reason`; a stage passes failed rows through untouched, so every input
sample reaches the driver and lands in `index.parquet`. Tensors travel as safetensors bytes (the
bytes that go into the tar), pixels as uint8 bytes, so every column is a plain Arrow scalar.

Resumption is per sample: rows of committed tars with the current fingerprint are skipped;
everything else (missing, failed before, or encoded under another fingerprint) is encoded again.
"""
from __future__ import annotations

import dataclasses
import json
import tarfile
import time
from pathlib import Path

import numpy as np

from common import cli, progress
from shards import buckets, encoded, reasons
from shards import format as fmt
from shards.errors import SigmaError

KEPT, REJECTED, FAILED = reasons.KEPT, reasons.REJECTED, reasons.FAILED
READ_CPUS = 0.5  # CPU share of a read or preprocess task

# Every row has these columns (Ray Data needs one schema); stages fill them in.
ROW = dict(key="", source="", status=KEPT, reason="", width=0, height=0, recaption="", original="",
           image=b"", bucket="", bucket_h=0, bucket_w=0, resized_h=0, resized_w=0, crop="", pixels=b"",
           t5=b"", t5_len_recaption=0, t5_len_original=0, vae=b"")


def _row(**kw) -> dict:
    return {**ROW, **kw}


# ---------------------------------------------------------------------------------------------
# Stage 1: read one curated shard (task) -> one row per sample
# ---------------------------------------------------------------------------------------------


def _scan_tar(path: str, keys: list[str]) -> None:
    """Read the whole tar once, collecting its keys; raises on a corrupt or truncated tar.

    A first pass reads every byte, so a shard is either fully valid or skipped as a whole, while
    the second pass (`_samples`) holds only one sample in memory (4K shards are gigabytes).
    """
    with tarfile.open(path, "r") as tar:
        for member in tar:
            if member.isfile():
                tar.extractfile(member).read()
                key = Path(member.name).name.partition(".")[0]
                if not keys or keys[-1] != key:
                    keys.append(key)
        # tarfile takes a cut at a header boundary for the end of the archive; a complete tar has
        # two zero blocks after its last member.
        if Path(path).stat().st_size < tar.offset + 2 * tarfile.BLOCKSIZE:
            raise tarfile.ReadError(f"truncated after {len(keys)} samples (no end-of-archive blocks)")


def _samples(path: str):
    """(key, {suffix: bytes}) per sample; a sample's members are consecutive, as WebDataset writes them."""
    key, members = None, {}
    with tarfile.open(path, "r") as tar:
        for member in tar:
            if not member.isfile():
                continue
            k, _, suffix = Path(member.name).name.partition(".")
            if k != key and members:
                yield key, members
                members = {}
            key, members[suffix] = k, tar.extractfile(member).read()
    if members:
        yield key, members


def _captions(path: Path) -> dict[str, dict]:
    """{key: caption row}; empty when the file is missing or unreadable (its samples: missing_caption)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.exists():
        print(f"encode: {path}: no caption file; its samples are reported as missing_caption", flush=True)
        return {}
    try:
        return {r["key"]: r for r in pq.read_table(path).to_pylist()}
    except (pa.ArrowException, OSError) as e:
        print(f"encode: {path}: unreadable caption file ({e}); its samples are reported as missing_caption", flush=True)
        return {}


def read_shard(task: dict, tier: str):
    """Rows for every sample of one curated shard, minus those already encoded (`task["done"]`)."""
    source, done = Path(task["shard"]).name, set(task["done"])
    captions = _captions(Path(task["captions"]))
    keys: list[str] = []
    try:
        _scan_tar(task["shard"], keys)
    except (tarfile.TarError, EOFError, OSError) as e:
        print(f"encode: {task['shard']}: corrupt shard, skipped ({type(e).__name__}: {e})", flush=True)
        for k in sorted((set(captions) | set(keys)) - done):
            yield _row(key=k, source=source, status=FAILED, reason=reasons.CORRUPT_SHARD)
        return
    for key, members in _samples(task["shard"]):
        if key not in done:
            yield _sample_row(key, members, captions.get(key), source, tier)


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
        feats, lengths = self.t5.encode_captions(self.tokenizer, self.encoder, texts, self.max_length,
                                                 batch_size=self.batch_size) if texts else ([], [])
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
        import torch

        batch = {k: list(v) for k, v in batch.items()}
        groups: dict[tuple[int, int], list[int]] = {}
        for i in _ok(batch):
            groups.setdefault((batch["bucket_h"][i], batch["bucket_w"][i]), []).append(i)
        for (bh, bw), rows in groups.items():
            pixels = np.stack([np.frombuffer(batch["pixels"][i], np.uint8).reshape(bh, bw, 3) for i in rows])  # [b, H, W, 3]
            x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # [b, 3, H, W] in [-1, 1]
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


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def plan(cfg, images: str, captions: str, out: str, tier: str) -> dict:
    """Everything a run decides before touching data (what --dry-run prints)."""
    e, m = cfg.encode, cfg.models
    fp = encoded.fingerprint(encoded.model_id(m.t5), e.t5_dtype, e.t5_max_length, encoded.model_id(m.vae),
                             e.vae_dtype, e.vae_tiling, buckets.TIER_TABLES[tier])
    shards = [str(p) for p in fmt.expand_shards(images)]
    return dict(images=images, shards=len(shards), shard_list=shards, captions=captions, out=out, tier=tier,
                table=buckets.TIER_TABLES[tier], fingerprint=fp, t5=m.t5, vae=m.vae, encode=dataclasses.asdict(e))


def run(cfg, images: str, captions: str, out: str, tier: str) -> dict:
    """Encode what is missing; write shards, index.parquet and info.json. Returns a summary."""
    import pyarrow as pa

    from shards import atomic

    t0 = time.time()
    p = plan(cfg, images, captions, out, tier)
    fp, e = p["fingerprint"], cfg.encode
    encdir = Path(out)
    encdir.mkdir(parents=True, exist_ok=True)
    _check_tier(encdir, tier)
    removed = encoded.remove_incomplete(encdir) + encoded.remove_stale(encdir, fp)
    done = encoded.committed_rows(encdir)
    done_by_source = done.groupby("source")["key"].apply(list).to_dict() if len(done) else {}
    tasks = [dict(shard=s, captions=str(fmt.caption_file(captions, s)), done=done_by_source.get(Path(s).name, []))
             for s in p["shard_list"]]

    ray = cli.init_ray(cfg)
    _check_gpus(ray, e)
    writers: dict[tuple[int, int], encoded.BucketWriter] = {}
    failures: list[dict] = []
    if tasks:
        with progress.bar(_to_encode(tasks), "sample", f"encode {tier}") as bar:
            for batch in _dataset(ray, tasks, cfg, tier).iter_batches(batch_size=64, batch_format="numpy"):
                bar.update(len(batch["key"]))
                for i in range(len(batch["key"])):
                    row = {k: batch[k][i] for k in ROW}
                    if row["status"] != KEPT:
                        failures.append(_index_row(row, fp, shard=""))
                        continue
                    hw = (int(row["bucket_h"]), int(row["bucket_w"]))
                    if hw not in writers:
                        writers[hw] = encoded.BucketWriter(encdir, hw, fp, e.shard_bytes)
                    committed = len(writers[hw].written)
                    writers[hw].write(_meta(row, fp), row["t5"], row["vae"], _index_row(row, fp, shard=""))
                    if len(writers[hw].written) > committed:  # a shard was completed: the log's progress line
                        progress.say(f"encode {tier}: {hw[0]}x{hw[1]} shard committed, "
                                     f"{sum(len(w.written) for w in writers.values())} samples encoded so far")
    for w in writers.values():
        w.close()

    index = _merge_index(encdir, encoded.committed_rows(encdir), failures, {t["shard"] for t in tasks})
    atomic.write_parquet(encdir / encoded.INDEX, pa.Table.from_pandas(index, preserve_index=False))
    _write_info(ray, encdir, cfg, tier, fp)
    counts = index.groupby(["status", "reason"]).size().to_dict() if len(index) else {}
    return dict(out=str(encdir), fingerprint=fp, encoded_now=sum(len(w.written) for w in writers.values()),
                removed_stale_or_partial=removed, total=len(index),
                counts={f"{s}/{r}" if r else s: int(n) for (s, r), n in counts.items()}, seconds=round(time.time() - t0, 1))


def _to_encode(tasks: list[dict]) -> int | None:
    """Samples left to encode, from the caption files' row counts (one row per sample); None if one is missing."""
    import pyarrow.parquet as pq

    try:
        return sum(pq.ParquetFile(t["captions"]).metadata.num_rows - len(t["done"]) for t in tasks)
    except (OSError, ValueError):  # reported per sample as missing_caption; the bar just has no ETA
        return None


def _dataset(ray, tasks: list[dict], cfg, tier: str):
    e, m = cfg.encode, cfg.models
    ds = ray.data.from_items(tasks, override_num_blocks=len(tasks))
    # Reading a tar is I/O: half a CPU, so the model actors never starve it of a slot (a deadlock on 2 CPUs).
    ds = ds.flat_map(read_shard, fn_kwargs=dict(tier=tier), num_cpus=READ_CPUS)
    r = e.t5_resources
    ds = ds.map_batches(T5Stage, fn_constructor_kwargs=dict(model=m.t5, dtype=e.t5_dtype, max_length=e.t5_max_length,
                                                             batch_size=r.batch_size),
                        batch_size=r.batch_size, num_gpus=r.num_gpus or None, num_cpus=r.num_cpus,
                        compute=ray.data.ActorPoolStrategy(size=r.concurrency), batch_format="numpy")
    ds = ds.map_batches(preprocess, fn_kwargs=dict(tier=tier, max_pixels=cfg.curation.max_pixels),
                        batch_size=e.vae_resources.batch_size, num_cpus=READ_CPUS, batch_format="numpy")
    r = e.vae_resources
    ds = ds.map_batches(VAEStage, fn_constructor_kwargs=dict(model=m.vae, dtype=e.vae_dtype, tiling=e.vae_tiling,
                                                             slicing=e.vae_slicing),
                        batch_size=r.batch_size, num_gpus=r.num_gpus or None, num_cpus=r.num_cpus,
                        compute=ray.data.ActorPoolStrategy(size=r.concurrency), batch_format="numpy")
    ds.context.execution_options.preserve_order = True  # same input, same shard contents (this dataset only)
    return ds


def _check_tier(encdir: Path, tier: str) -> None:
    """One ENCDIR holds one tier: a different --tier is almost surely a typo, not a wish to re-encode."""
    path = encdir / encoded.INFO
    if path.exists():
        old = json.loads(path.read_text()).get("tier")
        if old and old != tier:
            raise SigmaError(f"{encdir}: holds tier {old}, not {tier}; use another --out for tier {tier}")


def _check_gpus(ray, e) -> None:
    want = max(e.t5_resources.num_gpus, e.vae_resources.num_gpus)
    if want > 0 and ray.cluster_resources().get("GPU", 0) < want:
        raise SigmaError("encode.t5_resources/vae_resources ask for GPUs but the Ray cluster has none; "
                 "use --set encode.t5_resources.num_gpus=0 --set encode.vae_resources.num_gpus=0 (or --profile demo)")


def _meta(row: dict, fp: str) -> dict:
    return {
        "key": row["key"], "bucket": row["bucket"], "bucket_hw": [int(row["bucket_h"]), int(row["bucket_w"])],
        "size": [int(row["height"]), int(row["width"])], "resized": [int(row["resized_h"]), int(row["resized_w"])],
        "crop_box": json.loads(row["crop"]),
        "captions": {"recaption": row["recaption"], **({"original": row["original"]} if row["original"] else {})},
        "t5_lengths": {"recaption": int(row["t5_len_recaption"]),
                       **({"original": int(row["t5_len_original"])} if row["original"] else {})},
        "source": row["source"], "fingerprint": fp, "format_version": encoded.FORMAT_VERSION,
    }


def _index_row(row: dict, fp: str, shard: str) -> dict:
    return dict(key=row["key"], status=row["status"], reason=row["reason"], shard=shard, bucket=row["bucket"],
                bucket_h=int(row["bucket_h"]), bucket_w=int(row["bucket_w"]), width=int(row["width"]),
                height=int(row["height"]), t5_len_recaption=int(row["t5_len_recaption"]),
                t5_len_original=int(row["t5_len_original"]), source=row["source"], fingerprint=fp)


def _merge_index(encdir: Path, committed, failures: list[dict], inputs: set[str]):
    """Committed rows + this run's non-encoded rows + earlier runs' non-encoded rows of other inputs."""
    import pandas as pd
    import pyarrow.parquet as pq

    frames = [committed, pd.DataFrame(failures, columns=encoded.INDEX_COLUMNS)]
    old_path = encdir / encoded.INDEX
    if old_path.exists():
        old = pq.read_table(old_path).to_pandas()
        old = old[(old["status"] != KEPT) & ~old["source"].isin({Path(s).name for s in inputs})]
        frames.append(old)
    index = pd.concat([f for f in frames if len(f)], ignore_index=True) if any(len(f) for f in frames) \
        else pd.DataFrame(columns=encoded.INDEX_COLUMNS)
    index = index.drop_duplicates("key", keep="first")[encoded.INDEX_COLUMNS]
    return index.sort_values(["source", "key"], kind="stable").reset_index(drop=True)


def _write_info(ray, encdir: Path, cfg, tier: str, fp: str) -> None:
    """info.json (VAE scaling factor, latent channels, T5 width) and the null caption, once per fingerprint."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    from shards import atomic

    e, m = cfg.encode, cfg.models
    null_path = encdir / "null_caption.safetensors"
    old = json.loads((encdir / encoded.INFO).read_text()) if (encdir / encoded.INFO).exists() else {}
    if old.get("fingerprint") != fp or not null_path.exists():
        r = e.t5_resources
        task = ray.remote(num_gpus=r.num_gpus or None, num_cpus=r.num_cpus)(null_caption)
        atomic.write_bytes(null_path, ray.get(task.remote(m.t5, e.t5_dtype, e.t5_max_length)))
    vae_cfg = AutoencoderKL.load_config(m.vae)
    y = load_file(null_path)["y_embedding"]  # [L, C]
    encoded.write_info(encdir, dict(
        fingerprint=fp, tier=tier, table=buckets.TIER_TABLES[tier], t5=m.t5, t5_dtype=e.t5_dtype,
        max_length=e.t5_max_length, t5_dim=int(y.shape[1]), vae=m.vae, vae_dtype=e.vae_dtype,
        scaling_factor=float(vae_cfg.get("scaling_factor", 0.18215)), latent_channels=int(vae_cfg.get("latent_channels", 4)),
        vae_tiling=e.vae_tiling, null_caption="null_caption.safetensors", preprocess=encoded.PREPROCESS,
    ))


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = cli.parser("encoding/encode", "Encode curated images + captions into bucketed training shards "
                    "(T5 features of both captions, VAE latent mean/std).",
                    "encoding/encode --images 'cur/shards/*.tar' --captions caps --out enc/1k --tier 1k --profile demo")
    ap.add_argument("--images", required=True, help="curated shards: a glob, a brace pattern or a folder")
    ap.add_argument("--captions", required=True, help="CAPDIR with NNNNN.parquet per curated shard")
    ap.add_argument("--out", required=True, help="ENCDIR to write (resumable: rerun to finish or update)")
    ap.add_argument("--tier", required=True, choices=list(buckets.TIER_TABLES), help="bucket table to encode at")
    args = ap.parse_args(argv)
    cfg = cli.load(args)
    p = plan(cfg, args.images, args.captions, args.out, args.tier)
    if args.dry_run:
        cli.print_plan({k: v for k, v in p.items() if k != "shard_list"})
        return
    if not p["shard_list"]:
        cli.fail(f"--images {args.images}: no shards found")
    missing = [s for s in p["shard_list"] if not Path(s).exists()]
    if missing:
        cli.fail(f"--images: {missing[0]}: no such file")
    if not Path(args.captions).is_dir():
        cli.fail(f"--captions {args.captions}: not a folder")
    try:
        summary = run(cfg, args.images, args.captions, args.out, args.tier)
    except SigmaError as e:
        cli.fail(str(e))
    print(json.dumps(summary, indent=2))
