#!/usr/bin/env python3
"""`python curation/run.py (--urls LIST | --images SPEC) --out DIR [--config ...] [--profile ...] [--set k=v]`:
arguments, input checks (one-line errors before Ray starts), plan, then the pipeline."""

from __future__ import annotations

import json
import os
import sys

if __name__ == "__main__":  # as a script: the repo root replaces this folder (its modules must not shadow the stdlib)
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    from common import interpreter  # standard library only, before any package loads

    interpreter.check()  # the system python (no venv): one line on how to get the project's

from common import cli, config
from shards.errors import SigmaError

EXAMPLE = "python curation/run.py --urls urls.parquet --out curated --profile demo"


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    p = cli.parser(
        "curation/run.py",
        "Curate a URL list (or images on disk) into high-resolution image shards + "
        "a manifest (download, tiers, quality, aesthetics, dedup) on Ray.",
        EXAMPLE,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--urls",
        help="URL list: .parquet, .csv, .tsv, .jsonl or .txt (one URL a line), or a folder "
        "or glob of them; URL and caption columns found (url/URL, caption/TEXT/text/alt) or named "
        "below; other columns are carried into the manifest",
    )
    src.add_argument(
        "--images",
        help="images already on disk, curated without downloading: WebDataset/img2dataset "
        "tars (a .tar, '{00000..00009}.tar', a glob, or their folder), a folder of images (same-stem "
        ".txt captions), or a .parquet/.arrow table with an image-bytes column",
    )
    p.add_argument("--url-col", help="the URL column (curation.url_col)")
    p.add_argument("--caption-col", help="the caption / alt-text column (curation.caption_col)")
    p.add_argument("--image-col", help="a table's image-bytes column, for --images (curation.image_col)")
    p.add_argument("--out", required=True, help="output folder (rerun with the same arguments to resume)")
    p.add_argument(
        "--dedup-against",
        nargs="+",
        default=[],
        metavar="OUT",
        help="earlier runs' output folders: new images that duplicate their kept ones are `duplicate`, "
        "dup_of = '<folder name>/<key>'",
    )
    args = p.parse_args(argv)
    cfg = cli.load(args)
    for flag in ("url_col", "caption_col", "image_col"):
        if getattr(args, flag):
            setattr(cfg.curation, flag, getattr(args, flag))
    not_checked = _input_problems(cfg)  # the checks a real run makes, so --dry-run is honest
    from curation import dedup_job, inputs, pipeline
    from shards import storage

    try:  # each user path resolved once; a bucket's endpoint, access and existence checked (reads only)
        out = storage.resolve(args.out, cfg.storage)
        against = [storage.resolve(a, cfg.storage) for a in args.dedup_against]
        for loc in (storage.resolve(args.urls or args.images, cfg.storage), out, *against):
            storage.probe(loc)
    except SigmaError as e:
        cli.fail(str(e))
    source = None
    try:
        source = input_source(args, cfg)  # headers read, columns chosen
    except inputs.NotFound as e:  # --dry-run plans without the data, and says what it could not check
        not_checked.append(str(e))
    except SigmaError as e:
        cli.fail(str(e))
    except Exception as e:  # a storage fault past the probe (a key's own policy, a dropped connection)
        message = storage.failure(args.urls or args.images, e)
        if message is None:
            raise
        cli.fail(message)
    if not_checked and not args.dry_run:
        cli.fail(not_checked[0])
    for line in not_checked:  # a dry run needs no model files or input yet: it says what it could not check
        cli.unchecked(line)

    try:
        against = dedup_job.earlier_runs(against, out)
    except SigmaError as e:
        cli.fail(str(e))
    except Exception as e:
        message = storage.failure("--dedup-against", e)
        if message is None:
            raise
        cli.fail(message)
    if args.urls and source is not None and source.caption_col is None:  # runs, but says so (after the checks)
        print(
            f"note: {args.urls}: no caption column (looked for {', '.join(inputs.CAPTION_NAMES)}): no KEY.txt, "
            "no original_caption; name one with --caption-col",
            file=sys.stderr,
        )

    if args.dry_run:
        cur = cfg.curation
        unchecked = {"urls" if args.urls else "images": args.urls or args.images, "checked": False}
        cli.print_plan(
            {
                "input": source.describe() if source else unchecked,
                "out": args.out,
                "profile": cfg.profile,
                "clip": vars(cfg.models.clip),
                "aesthetic_head": cfg.models.aesthetic_head,
                "curation": json.loads(json.dumps(cur, default=vars)),
                **({"not_checked": not_checked} if not_checked else {}),
            }
        )
        return
    try:
        with cli.user_errors():
            stats = pipeline.run(source, out, cfg, against)
    except FileNotFoundError as e:
        cli.fail(str(e).splitlines()[0])
    if not stats["kept"]:  # a finished run, but say so: every input is in the manifest with its reason
        why = ", ".join(f"{r} {n}" for r, n in stats["reason"].items())
        what = "URLs" if args.urls else "images"
        print(
            f"curation: 0 of {stats['urls']} {what} kept ({why}); see {args.out}/manifest.parquet and report.html",
            file=sys.stderr,
        )
    if args.images:  # on disk: what the input itself says about how it was made
        from curation import sources

        for note in sources.notes(stats, out / "manifest.parquet"):
            print(f"note: {note}", file=sys.stderr)
    # the summary counts images on disk as images (stats.json keeps its key `urls`: others read it)
    summary = {"urls" if args.urls else "images": stats["urls"]}
    summary.update({k: stats[k] for k in ("status", "reason", "tier", "kept", "shards")})
    print(json.dumps(summary), file=sys.stdout)


def _input_problems(cfg) -> list[str]:
    """What a run needs before it starts and is missing: the model files the config enables."""
    needs = [(cfg.models.aesthetic_head, "models.aesthetic_head", True)]
    if cfg.curation.nsfw.enabled:
        needs.append((cfg.models.nsfw_head, "models.nsfw_head (curation.nsfw.enabled)", True))
    if cfg.curation.watermark.enabled:
        needs.append((cfg.models.watermark, "models.watermark (curation.watermark.enabled)", True))
    problems = []
    for path, key, weights in needs:
        try:
            config.require_file(path, key, weights=weights)
        except SigmaError as e:
            problems.append(str(e))
    from encoders import hub

    try:  # a file, or an open_clip tag whose hub repo is cached or reachable
        hub.require_clip(cfg.models.clip.arch, cfg.models.clip.weights)
    except SigmaError as e:
        problems.append(str(e))
    return problems


def input_source(args, cfg):
    """--urls or --images resolved (files, kind, columns; on disk or in a bucket), from headers only."""
    from curation import inputs, sources

    cur = cfg.curation
    if args.images:
        return sources.local_images(args.images, args.out, cur.caption_col, cur.image_col, cur.url_col, cfg.storage)
    return inputs.url_list(args.urls, cur.url_col, cur.caption_col, cfg.storage)


if __name__ == "__main__":
    main()
