"""`curation/run.py`: arguments, input checks, plan, then the pipeline."""
from __future__ import annotations

import json
import os
import sys

from common import cli, config
from shards.errors import SigmaError

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
    not_checked = _input_problems(cfg, args.urls)  # the checks a real run makes, so --dry-run is honest
    if not_checked and not args.dry_run:
        cli.fail(not_checked[0])
    for line in not_checked:  # a dry run needs no model files or URL list yet: it says what it could not check
        print(f"dry run: not checked: {line}", file=sys.stderr)
    from curation import decide, pipeline

    try:
        decide.earlier_runs(args.dedup_against, args.out)
    except SigmaError as e:
        cli.fail(str(e))

    if args.dry_run:
        cur = cfg.curation
        cli.print_plan({"urls": args.urls, "out": args.out, "profile": cfg.profile,
                        "clip": vars(cfg.models.clip), "aesthetic_head": cfg.models.aesthetic_head,
                        "curation": json.loads(json.dumps(cur, default=vars)),
                        **({"not_checked": not_checked} if not_checked else {})})
        return
    try:
        with cli.user_errors():
            stats = pipeline.run(args.urls, args.out, cfg, args.dedup_against)
    except FileNotFoundError as e:
        cli.fail(str(e).splitlines()[0])
    print(json.dumps({k: stats[k] for k in ("urls", "status", "reason", "tier", "kept", "shards")}), file=sys.stdout)



def _input_problems(cfg, urls: str) -> list[str]:
    """What a run needs before it starts and is missing: the model files the config enables, the URL list."""
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
    if not os.path.isfile(urls):
        problems.append(f"{urls}: URL list not found")
    if cfg.models.clip.weights and cfg.models.clip.weights != "openai":
        try:
            config.require_file(cfg.models.clip.weights, "models.clip.weights")
        except SigmaError as e:
            problems.append(str(e))
    return problems
