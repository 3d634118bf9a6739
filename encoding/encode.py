"""`encoding/encode`: curated shards + captions -> bucketed training shards, as a Ray Data pipeline.

    read_shard (tasks)  ->  T5Stage (actors)  ->  preprocess (tasks)  ->  VAEStage (actors)  ->  driver writes

The stages (Ray tasks and actors) are in encoding/actors.py; this is the driver. Every input sample
reaches it (failed rows pass through the stages untouched) and lands in `index.parquet`. A caption
table is first split into one caption file per shard by tasks (encoding/caption_table.py): the driver
hands each read task a file name, never caption rows or keys.

Resumption is per sample: rows of committed tars with the current fingerprint are skipped;
everything else (missing, or failed before) is encoded again. A resume whose inputs or settings
changed (ENCDIR/fingerprint.json) is refused unless `--reencode` accepts it: then samples encoded
under other settings are encoded again and new ones added (a changed caption of an already
encoded sample is not: use another --out for that).
"""

from __future__ import annotations

import dataclasses
import json
import time

from common import cli, progress, ray_start
from encoders import vae
from encoding import actors, caption_table
from shards import buckets, captions, encoded, fingerprint, reasons, storage
from shards import format as fmt
from shards.errors import SigmaError

KEPT, REJECTED, FAILED = reasons.KEPT, reasons.REJECTED, reasons.FAILED
ROW = actors.ROW


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def plan(cfg, images: str, captions_path: str, out: str, tier: str) -> dict:
    """Everything a run decides before touching data (what --dry-run prints)."""
    e, m = cfg.encode, cfg.models
    fp = encoded.fingerprint(
        encoded.model_id(m.t5),
        e.t5_dtype,
        e.t5_max_length,
        encoded.model_id(m.vae),
        e.vae_dtype,
        e.vae_tiling,
        buckets.TIER_TABLES[tier],
    )
    storage.resolve(out, cfg.storage)  # a URL this layer refuses is one line, before anything is read
    locs = fmt.shard_locs(images, cfg.storage)
    return dict(
        images=images,
        shards=len(locs),
        shard_list=locs,
        captions=captions_path,
        out=out,
        tier=tier,
        table=buckets.TIER_TABLES[tier],
        fingerprint=fp,
        t5=m.t5,
        vae=m.vae,
        encode=dataclasses.asdict(e),
        storage=cfg.storage,
    )


def check_inputs(p: dict) -> captions.CaptionSource:
    """The image shards exist and `--captions` holds caption files; SigmaError (one line) otherwise."""
    if not p["shard_list"]:
        raise SigmaError(f"--images {p['images']}: no shards found")
    missing = [s for s in p["shard_list"] if not s.exists()]
    if missing:
        raise SigmaError(f"--images: {missing[0]}: no such file")
    return captions.resolve(p["captions"], p["shard_list"], p["storage"])


def stage_fingerprint(cfg, p: dict, source: captions.CaptionSource) -> dict:
    """The inputs (image shards and caption files: fingerprint.listing, name + size + content) and what
    decides a sample's bytes."""
    e, m = cfg.encode, cfg.models
    files = [source.shard_file(s) for s in p["shard_list"]] if source.kind == captions.PER_SHARD else source.files
    return {
        "--images": fingerprint.listing(p["shard_list"]),
        "--captions": fingerprint.listing(files),
        "models.t5": encoded.model_id(m.t5),
        "models.vae": encoded.model_id(m.vae),
        "format": f"{encoded.LATENT_FORMAT}/{encoded.PREPROCESS}",
        **fingerprint.flat(e, "encode"),
    }


def _check_fingerprint(cfg, p: dict, source: captions.CaptionSource, encdir: storage.Loc, reencode: bool) -> None:
    """Refuse a resume with other inputs or settings, unless --reencode accepts them."""
    if reencode:
        (encdir / fingerprint.FILE).unlink()
    try:
        fingerprint.check(encdir, stage_fingerprint(cfg, p, source))
    except SigmaError as e:
        raise SigmaError(f"{e}; or pass --reencode to encode again what changed") from None


@fingerprint.releases_locks  # the OUT lock is held for this run only
def run(cfg, images: str, captions_path: str, out: str, tier: str, reencode: bool = False) -> dict:
    """Encode what is missing; write shards, index.parquet and info.json. Returns a summary.
    `reencode`: accept changed inputs or settings (re-encode stale samples, encode new ones)."""
    import pyarrow as pa

    from shards import atomic

    t0 = time.time()
    p = plan(cfg, images, captions_path, out, tier)
    source = check_inputs(p)
    from encoders import hub

    hub.require(cfg.models.t5, "models.t5", what="T5 encoder")  # before Ray or any model starts
    hub.require(cfg.models.vae, "models.vae", what="VAE")
    fp, e = p["fingerprint"], cfg.encode
    encdir = storage.resolve(out, cfg.storage)
    encdir.mkdir()
    _check_tier(encdir, tier)
    _check_fingerprint(cfg, p, source, encdir, reencode)
    removed = encoded.remove_incomplete(encdir) + encoded.remove_stale(encdir, fp)
    done = encoded.committed_rows(encdir)
    done_by_source = done.groupby("source")["key"].apply(list).to_dict() if len(done) else {}

    ray = ray_start.init_ray(cfg)
    _check_gpus(ray, e)
    capdir = caption_table.prepare(ray, source, p["shard_list"], encdir) if source.kind == captions.TABLE else None
    tasks = _tasks(p["shard_list"], source, capdir, done_by_source)
    writers: dict[tuple[int, int], encoded.BucketWriter] = {}
    failures: list[dict] = []
    try:
        if tasks:
            _encode(ray, tasks, cfg, tier=tier, encdir=encdir, fp=fp, writers=writers, failures=failures)
        for w in writers.values():
            w.close()
    except BaseException:  # a full disk, a crash, Ctrl-C: committed shards stay, no temp file is left
        for w in writers.values():
            w.abort()
        raise

    index = _merge_index(encdir, encoded.committed_rows(encdir), failures, {t["shard"].name for t in tasks})
    atomic.write_parquet(encdir / encoded.INDEX, pa.Table.from_pandas(index, preserve_index=False))
    _write_info(ray, encdir, cfg, tier, fp)
    counts = index.groupby(["status", "reason"]).size().to_dict() if len(index) else {}
    _check_something_encoded(index, captions_path)
    return dict(
        out=str(encdir),
        fingerprint=fp,
        encoded_now=sum(len(w.written) for w in writers.values()),
        removed_stale_or_partial=removed,
        total=len(index),
        counts={f"{s}/{r}" if r else s: int(n) for (s, r), n in counts.items()},
        seconds=round(time.time() - t0, 1),
    )


def _encode(
    ray, tasks: list[dict], cfg, tier: str, encdir: storage.Loc, fp: str, writers: dict, failures: list
) -> None:
    """Stream every sample through the stages; kept ones go to their bucket's writer, others to `failures`."""
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
                    writers[hw] = encoded.BucketWriter(encdir, hw, fp, cfg.encode.shard_bytes)
                committed = len(writers[hw].written)
                writers[hw].write(_meta(row, fp), row["t5"], row["vae"], _index_row(row, fp, shard=""))
                if len(writers[hw].written) > committed:  # a shard was completed: the log's progress line
                    progress.say(
                        f"encode {tier}: {hw[0]}x{hw[1]} shard committed, "
                        f"{sum(len(w.written) for w in writers.values())} samples encoded so far"
                    )


def _tasks(
    shard_list: list[storage.Loc], source: captions.CaptionSource, capdir: storage.Loc | None, done_by_source: dict
) -> list[dict]:
    """One read task per curated shard, naming its caption file: the per-shard file of a CAPDIR, or of
    `capdir`, the per-shard files a caption table was split into (encoding/caption_table.py). Tasks get
    Locs: a worker reads the tar and the caption file where they are (disk or bucket)."""
    return [
        dict(
            shard=s,
            captions=fmt.caption_file(capdir, s) if capdir is not None else source.shard_file(s),
            done=done_by_source.get(s.name, []),
        )
        for s in shard_list
    ]


def _check_something_encoded(index, captions_path: str) -> None:
    """A run that leaves nothing encoded because captions are missing is an error, not a quiet exit 0
    (index.parquet is written first, so every sample is still accounted for)."""
    if (index["status"] == KEPT).any():
        return
    missing = int((index["reason"] == reasons.MISSING_CAPTION).sum())
    if missing:
        raise SigmaError(
            f"--captions {captions_path}: nothing encoded: {missing} of {len(index)} samples have no "
            f"caption row (missing_caption); captions are matched by the curated `key`"
        )


def _to_encode(tasks: list[dict]) -> int | None:
    """Samples left to encode, from the caption rows (one row per sample); None if a file is missing."""
    import pyarrow.parquet as pq

    try:
        n = 0
        for t in tasks:
            with captions.readable(t["captions"]) as src:
                n += pq.ParquetFile(src).metadata.num_rows - len(t["done"])
        return n
    except (OSError, ValueError):  # reported per sample as missing_caption; the bar just has no ETA
        return None


def _dataset(ray, tasks: list[dict], cfg, tier: str):
    e, m = cfg.encode, cfg.models
    ds = ray.data.from_items(tasks, override_num_blocks=len(tasks))
    # Reading a tar is I/O: half a CPU, so the model actors never starve it of a slot (a deadlock on 2 CPUs).
    ds = ds.flat_map(actors.read_shard, fn_kwargs=dict(tier=tier), num_cpus=actors.READ_CPUS)
    r = e.t5_resources
    ds = ds.map_batches(
        actors.T5Stage,
        fn_constructor_kwargs=dict(model=m.t5, dtype=e.t5_dtype, max_length=e.t5_max_length, batch_size=r.batch_size),
        batch_size=r.batch_size,
        num_gpus=r.num_gpus or None,
        num_cpus=r.num_cpus,
        compute=ray.data.ActorPoolStrategy(size=r.concurrency),
        batch_format="numpy",
    )
    ds = ds.map_batches(
        actors.preprocess,
        fn_kwargs=dict(tier=tier, max_pixels=cfg.curation.max_pixels),
        batch_size=e.vae_resources.batch_size,
        num_cpus=actors.READ_CPUS,
        batch_format="numpy",
    )
    r = e.vae_resources
    ds = ds.map_batches(
        actors.VAEStage,
        fn_constructor_kwargs=dict(model=m.vae, dtype=e.vae_dtype, tiling=e.vae_tiling, slicing=e.vae_slicing),
        batch_size=r.batch_size,
        num_gpus=r.num_gpus or None,
        num_cpus=r.num_cpus,
        compute=ray.data.ActorPoolStrategy(size=r.concurrency),
        batch_format="numpy",
    )
    ds.context.execution_options.preserve_order = True  # same input, same shard contents (this dataset only)
    return ds


def _check_tier(encdir: storage.Loc, tier: str) -> None:
    """One ENCDIR holds one tier: a different --tier is almost surely a typo, not a wish to re-encode."""
    path = encdir / encoded.INFO
    if path.exists():
        old = json.loads(path.read_text()).get("tier")
        if old and old != tier:
            raise SigmaError(f"{encdir}: holds tier {old}, not {tier}; use another --out for tier {tier}")


def _check_gpus(ray, e) -> None:
    want = max(e.t5_resources.num_gpus, e.vae_resources.num_gpus)
    if want > 0 and ray.cluster_resources().get("GPU", 0) < want:
        raise SigmaError(
            "encode.t5_resources/vae_resources ask for GPUs but the Ray cluster has none; "
            "use --set encode.t5_resources.num_gpus=0 --set encode.vae_resources.num_gpus=0 (or --profile demo)"
        )


def _meta(row: dict, fp: str) -> dict:
    return {
        "key": row["key"],
        "bucket": row["bucket"],
        "bucket_hw": [int(row["bucket_h"]), int(row["bucket_w"])],
        "size": [int(row["height"]), int(row["width"])],
        "resized": [int(row["resized_h"]), int(row["resized_w"])],
        "crop_box": json.loads(row["crop"]),
        "captions": {"recaption": row["recaption"], **({"original": row["original"]} if row["original"] else {})},
        "t5_lengths": {
            "recaption": int(row["t5_len_recaption"]),
            **({"original": int(row["t5_len_original"])} if row["original"] else {}),
        },
        "source": row["source"],
        "fingerprint": fp,
        "format_version": encoded.FORMAT_VERSION,
    }


def _index_row(row: dict, fp: str, shard: str) -> dict:
    return dict(
        key=row["key"],
        status=row["status"],
        reason=row["reason"],
        shard=shard,
        bucket=row["bucket"],
        bucket_h=int(row["bucket_h"]),
        bucket_w=int(row["bucket_w"]),
        width=int(row["width"]),
        height=int(row["height"]),
        t5_len_recaption=int(row["t5_len_recaption"]),
        t5_len_original=int(row["t5_len_original"]),
        source=row["source"],
        fingerprint=fp,
    )


def _merge_index(encdir: storage.Loc, committed, failures: list[dict], inputs: set[str]):
    """Committed rows + this run's non-encoded rows + earlier runs' non-encoded rows of other inputs."""
    import pandas as pd
    import pyarrow.parquet as pq

    columns = encoded.INDEX_COLUMNS + [encoded.len_column(n) for n in encoded.INLINE_SETS]
    frames = [committed, pd.DataFrame(failures, columns=columns)]
    old_path = encdir / encoded.INDEX
    if old_path.exists():
        with captions.readable(old_path) as src:
            old = pq.read_table(src).to_pandas()
        old = old[(old["status"] != KEPT) & ~old["source"].isin(inputs)]
        frames.append(old)
    index = (
        pd.concat([f for f in frames if len(f)], ignore_index=True)
        if any(len(f) for f in frames)
        else pd.DataFrame(columns=columns)
    )
    index = index.drop_duplicates("key", keep="first")[columns]
    return index.sort_values(["source", "key"], kind="stable").reset_index(drop=True)


def _write_info(ray, encdir: storage.Loc, cfg, tier: str, fp: str) -> None:
    """info.json (the T5 and VAE used: path, id, revision; VAE scaling factor, latent channels, T5 width)
    and the null caption, once per fingerprint. Training copies the models into its run.json."""
    from safetensors.torch import load

    from shards import atomic

    e, m = cfg.encode, cfg.models
    null_path = encdir / "null_caption.safetensors"
    old = json.loads((encdir / encoded.INFO).read_text()) if (encdir / encoded.INFO).exists() else {}
    if old.get("fingerprint") != fp or not null_path.exists():
        r = e.t5_resources
        task = ray.remote(num_gpus=r.num_gpus or None, num_cpus=r.num_cpus)(actors.null_caption)
        data = ray.get(task.remote(m.t5, e.t5_dtype, e.t5_max_length))
        atomic.write_bytes(null_path, data)
    else:
        data = null_path.read_bytes()
    scale, channels = vae.latent_format(vae.read_config(m.vae))
    y = load(data)["y_embedding"]  # [L, C]
    encoded.write_info(
        encdir,
        dict(
            fingerprint=fp,
            tier=tier,
            table=buckets.TIER_TABLES[tier],
            **encoded.model_facts("t5", m.t5),
            t5_dtype=e.t5_dtype,
            max_length=e.t5_max_length,
            t5_dim=int(y.shape[1]),
            **encoded.model_facts("vae", m.vae),
            vae_dtype=e.vae_dtype,
            scaling_factor=scale,
            latent_channels=channels,
            vae_tiling=e.vae_tiling,
            null_caption="null_caption.safetensors",
            preprocess=encoded.PREPROCESS,
        ),
    )


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = cli.parser(
        "encoding/encode",
        "Encode curated images + captions into bucketed training shards "
        "(T5 features of both captions, VAE latent mean/std).",
        "encoding/encode --images 'cur/shards/*.tar' --captions caps --out enc/1k --tier 1k --profile demo",
    )
    ap.add_argument("--images", required=True, help="curated shards: a glob, a brace pattern or a folder")
    ap.add_argument(
        "--captions",
        required=True,
        help="CAPDIR (NNNNN.parquet per curated shard, from captioning/recaption), or a caption table: "
        "a .parquet/.jsonl/.csv file or a folder of them with `key, caption` (keyed by the curated key)",
    )
    ap.add_argument("--out", required=True, help="ENCDIR to write (resumable: rerun to finish or update)")
    ap.add_argument("--tier", required=True, choices=list(buckets.TIER_TABLES), help="bucket table to encode at")
    ap.add_argument(
        "--reencode",
        action="store_true",
        help="resume although inputs or settings changed: encode new and changed-setting samples again",
    )
    args = ap.parse_args(argv)
    cfg = cli.load(args)
    with cli.user_errors():
        if args.dry_run:
            p = plan(cfg, args.images, args.captions, args.out, args.tier)
            try:
                source = check_inputs(p)
                p.update(captions_kind=source.kind, caption_files=len(source.files))
            except SigmaError as e:  # the data may come later: say what was not checked
                p["not_checked"] = [cli.unchecked(str(e))]
            cli.print_plan({k: v for k, v in p.items() if k not in ("shard_list", "storage")})
            return
        summary = run(cfg, args.images, args.captions, args.out, args.tier, reencode=args.reencode)
    print(json.dumps(summary, indent=2))
