"""Run every CPU benchmark and merge their tables into benchmarks/RESULTS.md.

Each benchmark is a script `benchmarks/<topic>.py` that measures on this machine and writes
`benchmarks/results/<topic>.md`; this file only runs them and concatenates the results, so a
single benchmark can be rerun alone (`python -m benchmarks.<topic>`) and merged with `--merge`.
`benchmarks/gpu.py` is not run here: it needs a CUDA machine.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOPICS = [
    "curation",
    "curation_scale",
    "curation_before_after",
    "curation_sources",
    "curation_buckets",
    "crawl",
    "captioning",
    "encode",
    "dit",
    "weak_to_strong",
    "judge",
    "metrics",
]


def merge() -> Path:
    parts = [(HERE / "results" / f"{t}.md") for t in TOPICS + ["gpu"]]
    body = "\n\n".join(p.read_text().strip() for p in parts if p.exists())
    out = HERE / "RESULTS.md"
    out.write_text(
        "# Benchmark results\n\nMeasured numbers only; each section names its machine and command.\n"
        "Regenerate with `make bench` (or one topic: `python -m benchmarks.<topic>` then "
        "`python -m benchmarks.run --merge`).\n\n" + body + "\n"
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--merge", action="store_true", help="only merge existing results")
    ap.add_argument("topics", nargs="*", default=TOPICS)
    args = ap.parse_args()
    if not args.merge:
        for topic in args.topics:
            print(f"=== benchmarks/{topic}.py", flush=True)
            subprocess.run([sys.executable, "-m", f"benchmarks.{topic}"], check=True, cwd=HERE.parent)
    print(f"wrote {merge()}")


if __name__ == "__main__":
    main()
