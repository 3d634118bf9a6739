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
from encoding import actors, caption_table, clipscore, sets
from shards import buckets, captions, encoded, fingerprint, reasons, storage
from shards import format as fmt
from shards.errors import SigmaError

KEPT, REJECTED, FAILED = reasons.KEPT, reasons.REJECTED, reasons.FAILED
ROW = actors.ROW


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def plan(cfg, images: str, captions_path: list[str], out: str, tier: str, first: list[str] | None = None) -> dict:
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
    set_plan = sets.parse(captions_path, first)
    # a URL this layer refuses, a missing bucket, access denied, an unreachable endpoint: one line, reading only
    storage.probe_all([images, out, *set_plan.sources.values()], cfg.storage)
    locs = fmt.shard_locs(images, cfg.storage)
    return dict(
        images=images,
        shards=len(locs),
        shard_list=locs,
        captions=set_plan.sources,
        first_sentence=set_plan.derived,
        caption_sets=set_plan.names,
        set_plan=set_plan,
        out=out,
        tier=tier,
        table=buckets.TIER_TABLES[tier],
        fingerprint=fp,
        t5=m.t5,
        vae=m.vae,
        encode=dataclasses.asdict(e),
        storage=cfg.storage,
    )


def check_inputs(p: dict) -> dict[str, captions.CaptionSource]:
    """The image shards exist and each `--captions` source holds caption files: {set: source}; SigmaError
    (one line) otherwise."""
    if not p["shard_list"]:
        raise SigmaError(f"--images {p['images']}: no shards found")
    missing = [s for s in p["shard_list"] if not s.has_file()]
    if missing:
        raise SigmaError(f"--images: {missing[0]}: no such file")
    return {name: captions.resolve(path, p["shard_list"], p["storage"]) for name, path in p["captions"].items()}


def _caption_key(name: str) -> str:
    """fingerprint.json's key of a set's caption files (`recaption` keeps the key it had before caption sets)."""
    return "--captions" if name == encoded.RECAPTION else f"--captions {name}"


def stage_fingerprint(cfg, p: dict, sources: dict[str, captions.CaptionSource]) -> dict:
    """The inputs (image shards and each set's caption files: fingerprint.listing, name + size + content) and
    what decides a sample's bytes."""
    e, m = cfg.encode, cfg.models
    files = {
        name: [source.shard_file(s) for s in p["shard_list"]] if source.kind == captions.PER_SHARD else source.files
        for name, source in sources.items()
    }
    return {
        "--images": fingerprint.listing(p["shard_list"]),
        **{_caption_key(name): fingerprint.listing(f) for name, f in files.items()},
        **{f"--first-sentence {name}": src for name, src in p["first_sentence"].items()},
        "models.t5": encoded.model_id(m.t5),
        "models.vae": encoded.model_id(m.vae),
        "format": f"{encoded.LATENT_FORMAT}/{encoded.PREPROCESS}",
        **fingerprint.flat(e, "encode"),
    }


def _check_fingerprint(cfg, p: dict, sources: dict, encdir: storage.Loc, reencode: bool) -> None:
    """Refuse a resume with other inputs or settings, unless --reencode accepts them. Caption sets are
    compared one by one: a set given for the first time is added (recorded), a set not given this run
    keeps its record, a set given again must have the same caption files."""
    from shards import atomic

    if reencode:
        (encdir / fingerprint.FILE).unlink()
    path = encdir / fingerprint.FILE
    current = stage_fingerprint(cfg, p, sources)
    old = json.loads(path.read_text()) if path.has_file() else None
    is_set = lambda k: k.startswith(("--captions", "--first-sentence"))
    compare = current
    if old is not None:
        compare = {k: v for k, v in current.items() if not (is_set(k) and k not in old)}
        compare.update({k: v for k, v in old.items() if is_set(k) and k not in current})
    try:
        fingerprint.check(encdir, compare, lease=True)
    except SigmaError as e:
        raise SigmaError(f"{e}; or pass --reencode to encode again what changed") from None
    if old is not None and set(current) - set(old):  # new sets: recorded beside the old ones
        atomic.write_text(path, json.dumps({**old, **current}, indent=2, sort_keys=True, default=str) + "\n")


@fingerprint.releases_locks  # the OUT lock is held for this run only
def run(
    cfg,
    images: str,
    captions_path: str | list[str],
    out: str,
    tier: str,
    reencode: bool = False,
    first_sentence: list[str] | None = None,
) -> dict:
    """Encode what is missing; write shards, caption sets, index.parquet and info.json. Returns a summary.
    `captions_path`: --captions values ([NAME=]PATH); `first_sentence`: --first-sentence values (NAME=SET).
    `reencode`: accept changed inputs or settings (re-encode stale samples, encode new ones)."""
    import pyarrow as pa

    from shards import atomic

    t0 = time.time()
    storage.take_retries()  # the summary counts this run's
    specs = [captions_path] if isinstance(captions_path, str) else list(captions_path)
    p = plan(cfg, images, specs, out, tier, first_sentence)
    sources = check_inputs(p)
    set_plan = p["set_plan"]
    from encoders import hub

    hub.require(cfg.models.t5, "models.t5", what="T5 encoder")  # before Ray or any model starts
    hub.require(cfg.models.vae, "models.vae", what="VAE")
    fp, e = p["fingerprint"], cfg.encode
    encdir = storage.resolve(out, cfg.storage)
    encdir.mkdir()
    _check_tier(encdir, tier)
    _check_fingerprint(cfg, p, sources, encdir, reencode)
    removed = encoded.remove_incomplete(encdir) + encoded.remove_stale(encdir, fp)
    done = encoded.committed_rows(encdir)
    done_by_source = done.groupby("source")["key"].apply(list).to_dict() if len(done) else {}

    ray = ray_start.init_ray(cfg)
    _check_gpus(ray, e)
    files = {name: _caption_files(ray, name, source, p["shard_list"], encdir) for name, source in sources.items()}
    clip_index = clipscore.curated_index(p["shard_list"]) if e.clip_score else []
    added = _add_sets(ray, cfg, encdir, set_plan, files, clip_index)  # sets new to committed tars: side files only
    tasks = _tasks(p["shard_list"], files, set_plan, done_by_source, clip_index)
    writers: dict[tuple[int, int], encoded.BucketWriter] = {}
    failures: list[dict] = []
    try:
        if tasks:
            _encode(
                ray,
                tasks,
                cfg,
                tier=tier,
                encdir=encdir,
                fp=fp,
                writers=writers,
                failures=failures,
                names=set_plan.names,
            )
        for w in writers.values():
            w.close()
    except BaseException:  # a full disk, a crash, Ctrl-C: committed shards stay, no temp file is left
        for w in writers.values():
            w.abort()
        raise

    held = _held_sets(encdir, set_plan)
    committed = encoded.committed_rows(encdir, list(held))
    index = _merge_index(encdir, committed, failures, {t["shard"].name for t in tasks})
    atomic.write_parquet(encdir / encoded.INDEX, pa.Table.from_pandas(index, preserve_index=False))
    _write_info(ray, encdir, cfg, tier, fp, held, set_plan)
    counts = index.groupby(["status", "reason"]).size().to_dict() if len(index) else {}
    _check_something_encoded(index, " ".join(specs))
    report = summary_file(encdir, index, held)
    _warn_sparse_sets(index, set_plan)
    return dict(
        out=str(encdir),
        fingerprint=fp,
        encoded_now=sum(len(w.written) for w in writers.values()),
        caption_sets={n: int((index[encoded.len_column(n)] > 0).sum()) for n in held},
        caption_set_files_added=added,
        caption_sets_summary=str(report),
        removed_stale_or_partial=removed,
        total=len(index),
        counts={f"{s}/{r}" if r else s: int(n) for (s, r), n in counts.items()},
        seconds=round(time.time() - t0, 1),
        **storage.retry_stats(encdir),
    )


def _encode(
    ray,
    tasks: list[dict],
    cfg,
    tier: str,
    encdir: storage.Loc,
    fp: str,
    writers: dict,
    failures: list,
    names: list[str],
) -> None:
    """Stream every sample through the stages; kept ones go to their bucket's writer (latents in the tar,
    each caption set in its side file), others to `failures`."""
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
                    writers[hw] = encoded.BucketWriter(encdir, hw, fp, cfg.encode.shard_bytes, tuple(names))
                committed = len(writers[hw].written)
                writers[hw].write(_meta(row, fp), None, row["vae"], _index_row(row, fp, shard=""), _set_entries(row))
                if len(writers[hw].written) > committed:  # a shard was completed: the log's progress line
                    progress.say(
                        f"encode {tier}: {hw[0]}x{hw[1]} shard committed, "
                        f"{sum(len(w.written) for w in writers.values())} samples encoded so far"
                    )


def _set_entries(row: dict) -> dict:
    """{set: (caption, features [n, C], CLIP-Score or None)} of an encoded row."""
    texts, feats, clip = json.loads(row["captions"]), encoded.unpack(row["t5"]), json.loads(row["clip"])
    return {name: (texts[name], feats[name], clip.get(name)) for name in feats}


def _caption_files(ray, name: str, source: captions.CaptionSource, shard_list: list, encdir: storage.Loc):
    """shard name -> its caption file: the per-shard file of a CAPDIR, or of the per-shard files a caption
    table is split into first (encoding/caption_table.py)."""
    if source.kind != captions.TABLE:
        return lambda shard: source.shard_file(shard)
    capdir = caption_table.prepare(ray, source, shard_list, encdir, name)
    return lambda shard: fmt.caption_file(capdir, shard)


def _tasks(
    shard_list: list[storage.Loc], files: dict, set_plan: sets.SetPlan, done_by_source: dict, clip_index: list
) -> list[dict]:
    """One read task per curated shard, naming its caption file in each named set (and, for CLIP-Scores,
    the curated image embeddings' files with their key ranges). Tasks get Locs: a worker reads the tar
    and the caption files where they are (disk or bucket)."""
    return [
        dict(
            shard=s,
            captions={name: f(s) for name, f in files.items()},
            derived=set_plan.derived,
            done=done_by_source.get(s.name, []),
            clip_index=clip_index,
        )
        for s in shard_list
    ]


def _t5_kwargs(cfg) -> dict:
    """T5Stage's arguments: the T5, and models.clip when encode.clip_score."""
    e, m = cfg.encode, cfg.models
    clip = dict(arch=m.clip.arch, weights=m.clip.weights, config_dir=m.clip.config_dir) if e.clip_score else None
    return dict(
        model=m.t5, dtype=e.t5_dtype, max_length=e.t5_max_length, batch_size=e.t5_resources.batch_size, clip=clip
    )


def _add_sets(ray, cfg, encdir: storage.Loc, set_plan: sets.SetPlan, files: dict, clip_index: list) -> int:
    """Side files of this run's sets for committed tars that lack them: caption files and T5 only (no image
    is read; tars and other sets are not touched). Returns how many side files were written."""
    tasks = sets.add_tasks(encdir, set_plan, lambda name, source: files[name](source))
    if not tasks:
        return 0
    for t in tasks:
        t["clip_index"] = clip_index
    ds = ray.data.from_items(tasks, override_num_blocks=len(tasks))
    ds = ds.flat_map(actors.read_for_sets, num_cpus=actors.READ_CPUS)
    ds = ray_start.on_actors(ds, actors.T5Stage, _t5_kwargs(cfg), cfg.encode.t5_resources)
    ds.context.execution_options.preserve_order = True  # each tar's rows in its order
    out = sets.SetFiles(encdir, tasks)
    n = sum(len(t["keys"]) for t in tasks)
    with progress.bar(n, "sample", "encode: caption sets for committed shards") as bar:
        for batch in ds.iter_batches(batch_size=64, batch_format="numpy"):
            bar.update(len(batch["key"]))
            for i in range(len(batch["key"])):
                ok = batch["status"][i] == KEPT
                feats = encoded.unpack(batch["t5"][i]) if ok else {}
                texts = json.loads(batch["captions"][i]) if ok else {}
                clip = json.loads(batch["clip"][i]) if ok else {}
                out.add(str(batch["tar"][i]), str(batch["key"][i]), texts, feats, clip)
    return out.written


def _held_sets(encdir: storage.Loc, set_plan: sets.SetPlan) -> list[str]:
    """The caption sets the folder holds after this run: the ones it held (info.json) and this run's."""
    path = encdir / encoded.INFO
    old = encoded.caption_sets(json.loads(path.read_text())) if path.has_file() else {}
    return list(dict.fromkeys([*old, *set_plan.names]))


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
            with captions.readable(next(iter(t["captions"].values()))) as src:
                n += pq.ParquetFile(src).metadata.num_rows - len(t["done"])
        return n
    except (OSError, ValueError):  # reported per sample as missing_caption; the bar just has no ETA
        return None


def _dataset(ray, tasks: list[dict], cfg, tier: str):
    e, m = cfg.encode, cfg.models
    ds = ray.data.from_items(tasks, override_num_blocks=len(tasks))
    # Reading a tar is I/O: half a CPU, so the model actors never starve it of a slot (a deadlock on 2 CPUs).
    ds = ds.flat_map(actors.read_shard, fn_kwargs=dict(tier=tier), num_cpus=actors.READ_CPUS)
    ds = ray_start.on_actors(ds, actors.T5Stage, _t5_kwargs(cfg), e.t5_resources)
    ds = ds.map_batches(
        actors.preprocess,
        fn_kwargs=dict(tier=tier, max_pixels=cfg.curation.max_pixels),
        batch_size=e.vae_resources.batch_size,
        num_cpus=actors.READ_CPUS,
        batch_format="numpy",
    )
    vae = dict(model=m.vae, dtype=e.vae_dtype, tiling=e.vae_tiling, slicing=e.vae_slicing)
    ds = ray_start.on_actors(ds, actors.VAEStage, vae, e.vae_resources)
    ds.context.execution_options.preserve_order = True  # same input, same shard contents (this dataset only)
    return ds


def _check_tier(encdir: storage.Loc, tier: str) -> None:
    """One ENCDIR holds one tier: a different --tier is almost surely a typo, not a wish to re-encode."""
    path = encdir / encoded.INFO
    if path.has_file():
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
        source=row["source"],
        clip_embedding=row.get("clip_image") or None,
        fingerprint=fp,
    )


def _merge_index(encdir: storage.Loc, committed, failures: list[dict], inputs: set[str]):
    """Committed rows + this run's non-encoded rows + earlier runs' non-encoded rows of other inputs."""
    import pandas as pd
    import pyarrow.parquet as pq

    columns = [c for c in committed.columns if c != "clip_embedding"]  # kept in the row files only
    frames = [committed, pd.DataFrame(failures, columns=columns)]
    old_path = encdir / encoded.INDEX
    if old_path.has_file():
        with captions.readable(old_path) as src:
            old = pq.read_table(src).to_pandas()
        old = old[(old["status"] != KEPT) & ~old["source"].isin(inputs)]
        frames.append(old)
    frames = [f.reindex(columns=columns) for f in frames]
    index = (
        pd.concat([f for f in frames if len(f)], ignore_index=True)
        if any(len(f) for f in frames)
        else pd.DataFrame(columns=columns)
    )
    index = index.drop_duplicates("key", keep="first")[columns]
    for c in columns:  # a failed sample has no caption in any set
        if c.startswith("t5_len_"):
            index[c] = index[c].fillna(0).astype("int64")
        elif c.startswith("clip_"):
            index[c] = index[c].astype("float64")
    return index.sort_values(["source", "key"], kind="stable").reset_index(drop=True)


def _write_info(ray, encdir: storage.Loc, cfg, tier: str, fp: str, held: list[str], set_plan: sets.SetPlan) -> None:
    """info.json (the T5 and VAE used: path, id, revision; VAE scaling factor, latent channels, T5 width)
    and the null caption, once per fingerprint. Training copies the models into its run.json."""
    from safetensors.torch import load

    from shards import atomic

    e, m = cfg.encode, cfg.models
    null_path = encdir / "null_caption.safetensors"
    old = json.loads((encdir / encoded.INFO).read_text()) if (encdir / encoded.INFO).has_file() else {}
    old_sets = encoded.caption_sets(old) if old else {}
    new_sets = {n: {"from": path} for n, path in set_plan.sources.items()}
    new_sets[encoded.ORIGINAL] = {"from": "curated alt text (KEY.txt or the caption row's original_caption)"}
    new_sets.update({n: {"from": f"first sentence of {src}"} for n, src in set_plan.derived.items()})
    if old.get("fingerprint") != fp or not null_path.has_file():
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
            caption_sets={n: {**old_sets.get(n, {}), **new_sets.get(n, {})} for n in held},
        ),
    )


def summary_file(encdir: storage.Loc, index, held: list[str], lowest: int = 5) -> storage.Loc:
    """ENCDIR/caption_sets.json: per set, how many encoded samples have it, its T5 lengths and, where
    scored, its CLIP-Score distribution and lowest-scoring samples (key, score, caption, tar)."""
    from shards import atomic

    kept = index[index["status"] == KEPT]
    out = {}
    for name in held:
        lens = kept[encoded.len_column(name)]
        has = lens > 0
        entry = {
            "samples": int(has.sum()),
            "missing": int((~has).sum()),
            "t5_tokens": _quantiles(lens[has]),
        }
        scores = kept[encoded.clip_column(name)].dropna()
        if len(scores):
            entry["clip_score"] = _quantiles(scores)
            low = kept.loc[scores.nsmallest(lowest).index]
            entry["lowest"] = [
                {"key": k, "clip_score": round(float(v), 2), "caption": _caption(encdir / sh, name, k), "shard": sh}
                for k, v, sh in zip(low["key"], low[encoded.clip_column(name)], low["shard"])
            ]
        out[name] = entry
    path = encdir / "caption_sets.json"
    atomic.write_text(path, json.dumps(out, indent=2) + "\n")
    return path


def _warn_sparse_sets(index, set_plan: sets.SetPlan) -> None:
    """One line on stderr per named set that most encoded samples lack (a table keyed for a few of them, a
    captioner run on some shards only): training with a weight on it is refused (shards/loader.py)."""
    import sys

    kept = index[index["status"] == KEPT]
    for name in set_plan.sources:
        have = int((kept[encoded.len_column(name)] > 0).sum())
        if have * 2 < len(kept):
            print(
                f"encode: warning: caption set {name!r} is missing for {len(kept) - have} of {len(kept)} encoded "
                f"samples (see {encoded.INFO} and caption_sets.json)",
                file=sys.stderr,
                flush=True,
            )


def _caption(tar: storage.Loc, name: str, key: str) -> str | None:
    """A sample's caption in set `name`, from the tar's side file (None for a version 1 inline set)."""
    side = encoded.set_file(tar, name)
    if not side.has_file():
        return None
    return next((r["caption"] for r in encoded.read_set(side, ["key", "caption"]) if r["key"] == key), None)


def _quantiles(values) -> dict:
    if not len(values):
        return {}
    q = values.astype(float).quantile([0.0, 0.1, 0.5, 0.9, 1.0]).round(2).tolist()
    return dict(zip(("min", "p10", "median", "p90", "max"), q), mean=round(float(values.mean()), 2))


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = cli.parser(
        "encoding/encode",
        "Encode curated images + captions into bucketed training shards "
        "(VAE latent mean/std; T5 features of each caption set).",
        "encoding/encode --images 'cur/shards/*.tar' --captions caps --out enc/1k --tier 1k --profile demo",
    )
    ap.add_argument("--images", required=True, help="curated shards: a glob, a brace pattern or a folder")
    ap.add_argument(
        "--captions",
        required=True,
        action="append",
        metavar="[NAME=]PATH",
        help="a caption set (repeatable): NAME ([a-z0-9_]+) from a CAPDIR (NNNNN.parquet per curated shard, from "
        "captioning/recaption) or a caption table (a .parquet/.jsonl/.csv file or a folder of them with `key, "
        "caption`, keyed by the curated key); a bare PATH is the set `recaption`. The set `original` (the alt "
        "text) is built in. Sets new to an existing --out are added to its shards without re-encoding images",
    )
    ap.add_argument(
        "--first-sentence",
        action="append",
        default=[],
        metavar="NAME=SET",
        help="a derived caption set (repeatable): the first sentence of SET's caption, encoded as its own set "
        "(e.g. --first-sentence short=recaption)",
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
            p = plan(cfg, args.images, args.captions, args.out, args.tier, args.first_sentence)
            try:
                sources = check_inputs(p)
                p.update(captions_kind={n: s.kind for n, s in sources.items()})
                p.update(caption_files={n: len(s.files) for n, s in sources.items()})
            except SigmaError as e:  # the data may come later: say what was not checked
                p["not_checked"] = [cli.unchecked(str(e))]
            cli.print_plan({k: v for k, v in p.items() if k not in ("shard_list", "storage", "set_plan")})
            return
        summary = run(
            cfg,
            args.images,
            args.captions,
            args.out,
            args.tier,
            reencode=args.reencode,
            first_sentence=args.first_sentence,
        )
    print(json.dumps(summary, indent=2))
