#!/usr/bin/env python3
"""`python curation/run.py --urls URLS --out DIR [--config ...] [--profile ...] [--set k=v]`: arguments,
input checks (one-line errors before Ray starts), plan, then the pipeline."""
from __future__ import annotations

import json
import os
import sys

if __name__ == "__main__":  # as a script: the repo root replaces this folder (its modules must not shadow the stdlib)
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from common import cli, config  # noqa: E402 - after the path fix above
from shards.errors import SigmaError  # noqa: E402 - after the path fix above

EXAMPLE = "python curation/run.py --urls urls.parquet --out curated --profile demo"


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    p = cli.parser("curation/run.py", "Curate a URL list into high-resolution image shards + a manifest "
                   "(download, tiers, quality, aesthetics, dedup) on Ray.", EXAMPLE)
    p.add_argument("--urls", required=True, help="URL list: .parquet, .csv or .jsonl with a `url` column "
                   "(optional `caption`; other columns are carried into the manifest)")
    p.add_argument("--out", required=True, help="output folder (rerun with the same arguments to resume)")
    p.add_argument("--dedup-against", nargs="+", default=[], metavar="OUT",
                   help="earlier runs' output folders: new images that duplicate their kept ones are `duplicate`, "
                        "dup_of = '<folder name>/<key>'")
    args = p.parse_args(argv)
    cfg = cli.load(args)
    try:
        config.require_file(cfg.models.aesthetic_head, "models.aesthetic_head", weights=True)
        if cfg.curation.nsfw.enabled:
            config.require_file(cfg.models.nsfw_head, "models.nsfw_head (curation.nsfw.enabled)", weights=True)
        if cfg.curation.watermark.enabled:
            config.require_file(cfg.models.watermark, "models.watermark (curation.watermark.enabled)", weights=True)
        if not os.path.isfile(args.urls):  # the same check a real run makes, so --dry-run is honest
            raise SigmaError(f"{args.urls}: URL list not found")
        if cfg.models.clip.weights and cfg.models.clip.weights != "openai":
            config.require_file(cfg.models.clip.weights, "models.clip.weights")
    except SigmaError as e:
        cli.fail(str(e))
    from curation import dedup_job, pipeline

    try:
        dedup_job.earlier_runs(args.dedup_against, args.out)
    except SigmaError as e:
        cli.fail(str(e))

    if args.dry_run:
        cur = cfg.curation
        cli.print_plan({"urls": args.urls, "out": args.out, "profile": cfg.profile,
                        "clip": vars(cfg.models.clip), "aesthetic_head": cfg.models.aesthetic_head,
                        "curation": json.loads(json.dumps(cur, default=vars))})
        return
    try:
        with cli.user_errors():
            stats = pipeline.run(args.urls, args.out, cfg, args.dedup_against)
    except FileNotFoundError as e:
        cli.fail(str(e).splitlines()[0])
    if not stats["kept"]:  # a finished run, but say so: every URL is in the manifest with its reason
        why = ", ".join(f"{r} {n}" for r, n in stats["reason"].items())
        print(f"curation: 0 of {stats['urls']} URLs kept ({why}); see {args.out}/manifest.parquet and "
              "report.html", file=sys.stderr)
    print(json.dumps({k: stats[k] for k in ("urls", "status", "reason", "tier", "kept", "shards")}), file=sys.stdout)


if __name__ == "__main__":
    main()
