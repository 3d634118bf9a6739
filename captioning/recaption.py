"""The recaptioning stage: curated shards -> one caption parquet per shard, as a Ray Data flow.

    shard paths --read_shard (tasks)--> one row per sample (key, image bytes, original caption)
                --captioner (actor pool, config resources)--> caption, status, reason
                --driver: clean, count T5 tokens, write CAPDIR/NNNNN.parquet once a shard is complete

The shard is the unit of work and of resumption: a finished shard has its parquet (written
atomically: one PUT in a bucket), so a rerun skips it and a killed run loses only the shards in
flight. The driver never touches pixels: it counts each tar's keys (headers only; for shards in a
bucket, in Ray tasks that read them where they are) to know when a shard is complete, and does text
work only. Images are read and decoded in the Ray workers. `--shards` and `--out` are resolved
once (shards/storage.py) and Locs handed down.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from captioning.batch import CaptionerArgs
from captioning.guard import GUARD_EXAMPLES, GUARD_EXAMPLES_PER_SHARD, GUARD_REASONS
from common import progress
from common.config import Captioner, Config
from common.gather import ShardGather
from shards import atomic, captions, curated, fingerprint, format, reasons, storage
from shards.errors import SigmaError

# ---------------------------------------------------------------------------------------------
# Reading curated shards
# ---------------------------------------------------------------------------------------------


def read_shard(item: dict) -> list[dict]:
    """One row per sample: the first image member's original bytes (b"" if none), and the .txt caption.
    `item["shard"]`: the tar's Loc (read where it is, disk or bucket); rows name it by its URL."""
    rows = []
    name = str(item["shard"])
    for index, (key, members) in enumerate(curated.samples(item["shard"])):
        image = next((members[e] for e in format.IMAGE_EXTS if e in members), b"")
        text = members.get(format.CAPTION_EXT, b"").decode("utf-8", errors="replace").strip()
        rows.append({"shard": name, "index": index, "key": key, "image": image, "original_caption": text})
    return rows


def count_keys(shard: storage.Loc) -> int | str:
    """A curated tar's sample count (headers only), or the CorruptShard's line (a Ray task for a bucket)."""
    try:
        return len(curated.keys(shard))
    except curated.CorruptShard as e:
        return str(e)


# ---------------------------------------------------------------------------------------------
# Plan
# ---------------------------------------------------------------------------------------------


def select(cfg: Config, name: str | None) -> tuple[str, Captioner]:
    """The named captioner's settings, checked: one-line SigmaError otherwise."""
    name = name or cfg.captioning.captioner
    where = f"captioning.captioners.{name}"
    if name not in cfg.captioning.captioners:
        raise SigmaError(f"{where}: no such captioner; choose one of {sorted(cfg.captioning.captioners)}")
    cap = cfg.captioning.captioners[name]
    if not cap.model and cap.backend != "original":
        raise SigmaError(f"{where}.model: not set")
    if cap.backend == "share-captioner" and not cap.trust_remote_code:
        raise SigmaError(
            f"{where}.trust_remote_code: Share-Captioner is remote code (InternLM-XComposer) and "
            "runs only on explicit opt-in; set it to true to load it"
        )
    if cap.require_revision and not cap.revision and not Path(cap.model).exists():
        raise SigmaError(
            f"{where}.revision: not pinned; set it to the hub commit of {cap.model} you checked "
            f"(`--set {where}.revision=<40-hex commit>`), or point model at a local folder"
        )
    if cap.engine_kwargs and cap.backend != "vllm":
        raise SigmaError(f"{where}.engine_kwargs: only the vllm backend takes engine arguments")
    return name, cap


def runtime_env(cap: Captioner) -> dict:
    """The captioner actors' Ray runtime_env: the config's, plus vLLM's own venv for the vllm backend."""
    env = dict(cap.runtime_env)
    if cap.backend == "vllm" and "py_executable" not in env:
        from captioning import vllm_env

        env["py_executable"] = str(vllm_env.check())
    return env


def captioner_id(cap: Captioner) -> str:
    """What the `captioner` column records: model id + revision ('local' for a folder); `original` for
    the pass-through captioner."""
    if cap.backend == "original":
        return "original"
    return f"{cap.model}@{cap.revision or ('local' if Path(cap.model).exists() else 'main')}"


def plan(cfg: Config, shards: str, out: str, name: str | None = None, not_checked: list[str] | None = None) -> dict:
    """Everything a run will do, resolved; `--dry-run` prints it. With `not_checked` (a dry run), missing
    shards are noted there instead of raised: the plan is then made from the config alone. `--shards` and
    `--out` are resolved here, once: LOCS (not printed) holds their Locs."""
    # a missing bucket, access denied, an unreachable endpoint: one line before any work (reads only)
    storage.probe_all([shards, out], cfg.storage)
    out_loc = storage.resolve(out, cfg.storage)
    paths = format.shard_locs(shards, cfg.storage)
    problem = None
    if not paths:
        problem = SigmaError(f"--shards {shards}: matches no shard")
    present = [p for p in paths if p.is_file()]
    missing = [str(p) for p in paths if p not in set(present)]
    if missing:
        problem = SigmaError(f"--shards {missing[0]}: no such file ({len(missing)} missing)")
    if problem is not None:
        if not_checked is None:
            raise problem
        not_checked.append(str(problem))
        paths = present
    name, cap = select(cfg, name)
    done = [p for p in paths if format.caption_file(out_loc, p).has_file()]
    return {
        LOCS: {"shards": paths, "out": out_loc, "done": done},
        "shards": [str(p) for p in paths],
        "out": str(out),
        "done": [str(p) for p in done],
        "todo": [str(p) for p in paths if p not in set(done)],
        "captioner": name,
        "captioner_id": captioner_id(cap),
        "backend": cap.backend,
        "model": cap.model,
        "prompt": cap.prompt,
        "max_new_tokens": cap.max_new_tokens,
        "generate": cap.generate,
        "dtype": cap.dtype,
        "max_pixels": cap.max_pixels,
        "runtime_env": cap.runtime_env,
        "engine_kwargs": cap.engine_kwargs,
        "retry": cap.retry,
        "guard": vars(cfg.captioning.guard),
        "resources": vars(cap.resources),
        "strip_openings": cfg.captioning.strip_openings,
        "token_budget": cfg.captioning.token_budget,
        "t5_tokenizer": cfg.models.t5 if token_counts(cfg, cap) else None,
    }


def token_counts(cfg: Config, cap: Captioner) -> bool:
    """Whether the captions' T5 tokens are counted: always for a captioning model; for the `original`
    pass-through (no model at all) only when the T5 tokenizer is on this machine (a folder, or the
    Hugging Face cache), else `num_tokens` is 0 (not counted), said in one line."""
    from encoders import hub

    return cap.backend != "original" or hub.available(cfg.models.t5)


def require_models(cfg: Config, name: str, cap: Captioner) -> None:
    """Every model this run loads, checked before Ray starts: one line each (encoders/hub.py)."""
    from encoders import hub

    if cap.backend != "original":
        hub.require(cap.model, f"captioning.captioners.{name}.model", cap.revision, what="captioner")
    if token_counts(cfg, cap):
        hub.require(cfg.models.t5, "models.t5", what="T5 tokenizer")
    else:
        print(
            f"T5 token counts skipped: models.t5 {cfg.models.t5} is not on this machine (a local folder or the "
            "Hugging Face cache); num_tokens is 0 (not counted)",
            file=sys.stderr,
        )


def stage_fingerprint(p: dict) -> dict:
    """The settings that change a caption parquet; the shards are checked one by one (`_check_sources`),
    so more shards may be captioned into the same CAPDIR later."""
    from shards.encoded import model_id

    keys = (
        "backend",
        "prompt",
        "max_new_tokens",
        "generate",
        "dtype",
        "max_pixels",
        "strip_openings",
        "retry",
        "guard",
    )
    engine = {k: v for k, v in p["engine_kwargs"].items() if k not in ENGINE_RESOURCES}
    return {
        **{k: p[k] for k in keys},
        "engine": engine,
        "model": model_id(p["model"]) if p["model"] else "",
        "revision": p["captioner_id"].rpartition("@")[2],
        "t5_tokenizer": model_id(p["t5_tokenizer"]) if p["t5_tokenizer"] else None,
    }


def _check_sources(done: list[storage.Loc], out: storage.Loc) -> None:
    """A finished parquet records its tar's size: a changed tar is refused, not silently reused."""
    import pyarrow.parquet as pq

    for shard in done:
        with captions.readable(format.caption_file(out, shard)) as src:
            meta = pq.read_schema(src).metadata or {}
        size = meta.get(SOURCE_SIZE)
        if size is not None and int(size) != shard.size():
            raise SigmaError(
                f"{shard}: changed since {format.caption_file(out, shard)} was written from it "
                f"({int(size)} -> {shard.size()} bytes); use another --out, or delete "
                "that parquet to caption it again"
            )


LOCS = "_locs"  # the plan's resolved Locs (not printed)
SOURCE_SIZE = b"sigmaforge.source_size"
# engine_kwargs that size the engine without changing what it writes: not in the fingerprint
ENGINE_RESOURCES = (
    "gpu_memory_utilization",
    "tensor_parallel_size",
    "max_num_seqs",
    "max_num_batched_tokens",
    "enforce_eager",
    "swap_space",
)


def backend(cap: Captioner, guard=None) -> tuple[type, dict]:
    """The actor class for a captioner and its constructor arguments (a plain dict, not the config)."""
    common = dict(
        model=cap.model,
        prompt=cap.prompt,
        revision=cap.revision,
        dtype=cap.dtype,
        max_new_tokens=cap.max_new_tokens,
        generate=dict(cap.generate),
        trust_remote_code=cap.trust_remote_code,
        guard=dict(vars(guard)) if guard else None,
        retry=dict(cap.retry),
    )
    if cap.backend == "original":
        from captioning.original import OriginalCaptioner

        return OriginalCaptioner, {}
    if cap.backend == "share-captioner":
        from captioning.share_captioner import ShareCaptioner

        return ShareCaptioner, common
    args = CaptionerArgs(**common, max_pixels=cap.max_pixels)
    if cap.backend == "vllm":
        from captioning.vllm_engine import VLLMCaptioner  # only the module name: vllm itself loads in the actor

        return VLLMCaptioner, {"args": args, "engine_kwargs": dict(cap.engine_kwargs)}
    from captioning.hf import HFCaptioner

    return HFCaptioner, {"args": args}


# ---------------------------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------------------------


@fingerprint.releases_locks  # the OUT lock is held for this run only
def run(cfg: Config, shards: str, out: str, name: str | None = None) -> dict:
    """Caption every unfinished shard; returns the run summary (also printed as JSON)."""
    from common import ray_start

    storage.take_retries()  # the summary counts this run's
    p = plan(cfg, shards, out, name)
    _, cap = select(cfg, p["captioner"])
    require_models(cfg, p["captioner"], cap)
    locs = p[LOCS]
    out_loc: storage.Loc = locs["out"]
    out_loc.mkdir()
    fingerprint.check(out_loc, stage_fingerprint(p), lease=True)
    _check_sources(locs["done"], out_loc)
    atomic.clean_temp(out_loc)  # a killed run's half-written parquet never counts (a bucket has none)
    summary = {
        "shards": len(p["shards"]),
        "skipped": len(p["done"]),
        "written": 0,
        "corrupt_shards": [],
        "captions": 0,
        "failed": {},
        "over_budget": 0,
        "token_budget": p["token_budget"],
        "retried": 0,
        "recovered": 0,
    }
    todo = [s for s in locs["shards"] if s not in set(locs["done"])]
    by_url = {str(s): s for s in todo}
    expected: dict[str, int] = {}
    for shard, n in _count_keys(cfg, todo):
        if isinstance(n, str):  # reported; the next run retries it
            print(f"{reasons.CORRUPT_SHARD}: {n}; skipped", file=sys.stderr)
            summary["corrupt_shards"].append(str(shard))
        else:
            expected[str(shard)] = n
    for shard in [s for s, n in expected.items() if n == 0]:
        print(_write(out_loc, by_url[shard], [], cap, None, cfg)["line"], file=sys.stderr)
        summary["written"] += 1
        del expected[shard]
    if not expected:
        return _finish(summary, out_loc, p, cfg)

    ray_start.init_ray(cfg)  # binds nothing: `import ray.data` below gives the module
    import ray.data

    from encoders import t5

    tokenizer = t5.load_tokenizer(p["t5_tokenizer"]) if p["t5_tokenizer"] else None
    cls, kwargs = backend(cap, cfg.captioning.guard)
    ds = ray.data.from_items([{"shard": by_url[s]} for s in expected], override_num_blocks=len(expected))
    ds = ds.flat_map(read_shard)
    ds = ray_start.on_actors(ds, cls, kwargs, cap.resources, runtime_env=runtime_env(cap) or None)

    gather = ShardGather(expected)
    failed: Counter = Counter()
    bar = progress.bar(sum(expected.values()), "caption", "recaption")
    for row in ds.iter_rows():
        shard = row["shard"]
        rows = gather.add(shard, row)
        bar.update(1)
        if rows is not None:
            stats = _write(out_loc, by_url[shard], rows, cap, tokenizer, cfg)
            progress.say(stats["line"], file=sys.stderr)
            summary["written"] += 1
            summary["captions"] += stats["kept"]
            summary["over_budget"] += stats["over_budget"]
            summary["retried"] += stats["retried"]
            summary["recovered"] += stats["recovered"]
            failed.update(stats["failed"])
            bar.set_postfix(shards=f"{summary['written']}/{len(expected)}", refresh=False)
    bar.close()
    gather.close()  # a reader and the header listing disagreed: a bug, not bad data
    summary["failed"] = dict(failed)
    return _finish(summary, out_loc, p, cfg)


def _count_keys(cfg: Config, shards: list[storage.Loc]) -> list[tuple[storage.Loc, int | str]]:
    """Each shard's sample count, or its CorruptShard line. On disk the driver reads the headers; shards in a
    bucket are counted by Ray tasks where the data is (the driver never streams a tar)."""
    if all(s.is_local for s in shards):
        return [(s, count_keys(s)) for s in shards]
    from common import gather, ray_start

    ray = ray_start.init_ray(cfg)
    task = ray.remote(num_cpus=0.5)(count_keys)
    window = max(16, 8 * int(ray.cluster_resources().get("CPU", 1)))
    got = dict(gather.bounded(((s, task.remote(s)) for s in shards), window))
    return [(s, got[s]) for s in shards]


def _finish(summary: dict, out: storage.Loc, p: dict, cfg: Config) -> dict:
    """Print the summary; (re)write CAPDIR/report.html when a shard was written or it is missing."""
    from captioning.report import REPORT, write_caption_report

    report = out / REPORT
    if (summary["written"] or not report.has_file()) and out.glob("*.parquet"):
        write_caption_report(out, shards=p[LOCS]["shards"], token_budget=cfg.captioning.token_budget)
    summary["report"] = str(report)
    summary.update(storage.retry_stats(out))
    print(json.dumps(summary))
    return summary


def _write(out: storage.Loc, shard: storage.Loc, rows: list[dict], cap: Captioner, tokenizer, cfg: Config) -> dict:
    """Finish one shard's rows and write its parquet atomically; returns its counts."""
    import pyarrow as pa

    from captioning import postprocess

    rows = sorted(rows, key=lambda r: r["index"])
    if rows:
        postprocess.finish_rows(rows, tokenizer, cfg.captioning.strip_openings)
    cid = captioner_id(cap)
    columns = {
        "key": [r["key"] for r in rows],
        "caption": [r["caption"] for r in rows],
        "captioner": [cid] * len(rows),
        "prompt": [cap.prompt] * len(rows),
        "original_caption": [r["original_caption"] for r in rows],
        "num_tokens": pa.array([r["num_tokens"] for r in rows], pa.int32()),
        "status": [r["status"] for r in rows],
        "reason": [r["reason"] for r in rows],
    }
    assert list(columns) == format.CAPTION_COLUMNS
    types = {c: pa.string() for c in format.CAPTION_COLUMNS if c != "num_tokens"}
    table = pa.table({c: columns[c] if c == "num_tokens" else pa.array(columns[c], types[c]) for c in columns})
    examples = [
        {"key": r["key"], "reason": r["reason"], "text": r.get("rejected", "")[:500]}
        for r in rows
        if r["reason"] in GUARD_REASONS
    ][:GUARD_EXAMPLES_PER_SHARD]
    table = table.replace_schema_metadata(
        {SOURCE_SIZE: str(shard.size()), GUARD_EXAMPLES: json.dumps(examples, ensure_ascii=False)}
    )
    path = format.caption_file(out, shard)
    atomic.write_parquet(path, table)
    kept = [r for r in rows if r["status"] == reasons.KEPT]
    stats = {
        "kept": len(kept),
        "failed": Counter(r["reason"] for r in rows if r["status"] != reasons.KEPT),
        "over_budget": sum(r["num_tokens"] > cfg.captioning.token_budget for r in kept),
        "retried": sum(bool(r.get("retried")) for r in rows),
        "recovered": sum(bool(r.get("retried")) and r["status"] == reasons.KEPT for r in rows),
    }
    guarded = sum(n for reason, n in stats["failed"].items() if reason in GUARD_REASONS)
    stats["line"] = (
        f"{path.name}: {len(rows)} rows, {stats['kept']} captions, {sum(stats['failed'].values())} "
        f"failed ({guarded} by the caption guard, {stats['recovered']}/{stats['retried']} retried rows "
        f"recovered), {stats['over_budget']} over {cfg.captioning.token_budget} T5 tokens"
    )
    return stats


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    from common import cli

    p = cli.parser(
        "captioning/recaption",
        "Caption curated WebDataset shards with Share-Captioner, an HF vision-language model or a VLM on vLLM; "
        "one parquet per shard, resumable.",
        "captioning/recaption --shards 'cur/shards/{00000..00041}.tar' --out caps --profile demo",
    )
    p.add_argument(
        "--shards",
        required=True,
        help="curated shards: a brace pattern ('d/{00000..00041}.tar'), a glob or a directory",
    )
    p.add_argument("--out", required=True, help="CAPDIR: NNNNN.parquet per input shard")
    p.add_argument(
        "--captioner", default=None, help="a key of captioning.captioners in the config (default: captioning.captioner)"
    )
    args = p.parse_args(argv)
    cfg = cli.load(args)
    with cli.user_errors():
        if args.dry_run:
            not_checked: list[str] = []
            p = plan(cfg, args.shards, args.out, args.captioner, not_checked)
            for line in not_checked:
                cli.unchecked(line)
            shown = {k: v for k, v in p.items() if k != LOCS}
            cli.print_plan({**shown, **({"not_checked": not_checked} if not_checked else {})})
            return
        run(cfg, args.shards, args.out, args.captioner)
