"""The whole curation stage on real photos with exact and near duplicates: an earlier checkout vs this one.

    python -m benchmarks.curation_before_after [--urls 10000] [--bases 2500] [--before 6dd0690]

Images: `--bases` crops (1100-1500 px a side, JPEG q90) of the real photos in tools/real-images,
plus a near copy (resized to 97 %, JPEG q80) of every third crop; the URL list cycles over all of
them, so each file is reached by several URLs (exact copies). One loopback server serves both
runs. `--before` is checked out in a temporary git worktree and runs its own `curation/run.py`
with its own demo profile and tiny models, in this venv; then this checkout runs. Per side: wall
time, step times from stats.json, peak RSS of the driver and of the process tree, counts; and
whether both manifests agree on every URL's status, reason and dup_of.
Writes benchmarks/results/curation_before_after.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.curation import PROCESSES, REAL, THREADS, curate_argv, real_photos, run_measured

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "curation_before_after.md"


def variants(folder: Path, photos: list[str], bases: int, seed: int = 0) -> list[str]:
    """Write the crops and near copies into `folder` (once: reused when complete); returns their names."""
    from PIL import Image

    done = folder / "complete.json"
    if done.exists():
        return json.loads(done.read_text())
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for p, name in enumerate(photos):
        with Image.open(REAL / "images" / name) as im:
            im = im.convert("RGB")
        for b in range(p, bases, len(photos)):
            w, h = rng.randint(1100, 1500), rng.randint(1100, 1500)
            scale = max(w / im.width, h / im.height, rng.uniform(0.4, 1.0))
            src = (
                im.resize((max(w, round(im.width * scale)), max(h, round(im.height * scale))), Image.BILINEAR)
                if scale != 1
                else im
            )
            x, y = rng.randint(0, src.width - w), rng.randint(0, src.height - h)
            crop = src.crop((x, y, x + w, y + h))
            crop.save(folder / f"b{b:05d}.jpg", quality=90)
            names.append(f"b{b:05d}.jpg")
            if b % 3 == 0:
                crop.resize((round(w * 0.97), round(h * 0.97)), Image.BILINEAR).save(
                    folder / f"n{b:05d}.jpg", quality=80
                )
                names.append(f"n{b:05d}.jpg")
    done.write_text(json.dumps(sorted(names)))
    return sorted(names)


def side(checkout: Path, urls: Path, out: Path) -> dict:
    """One side's run of its own curation/run.py; wall time, peak RSS, stats."""
    env = {
        **os.environ,
        "PYTHONPATH": str(checkout),
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
    }
    subprocess.run(
        [sys.executable, "-m", "demo.tiny_models", str(checkout / ".cache" / "tiny")],
        cwd=checkout,
        env=env,
        check=True,
        capture_output=True,
    )
    argv = curate_argv(checkout / "curation" / "run.py", urls, out)
    wall, tree, top, _ = run_measured(argv, env, cwd=checkout)
    stats = json.loads((out / "stats.json").read_text())
    m = pd.read_parquet(
        out / "manifest.parquet",
        columns=["url", "key", "status", "reason", "dup_of", "width", "height", "sha256", "phash"],
    )
    return {"wall": wall, "tree": tree, "top": top, "stats": stats, "manifest": m, "images": kept_images(out)}


def kept_images(out: Path) -> list[tuple[str, str]]:
    """(member name, sha256 of its bytes) of every image in the output shards, in order."""
    found = []
    for tar in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t:
                if m.isfile() and m.name.rsplit(".", 1)[-1] in ("jpg", "jpeg", "png", "webp"):
                    found.append((m.name, hashlib.sha256(t.extractfile(m).read()).hexdigest()))
    return found


def _rule(checkout: Path):
    """That checkout's in-process dedup rule, `find_duplicates`, loaded from its own file (curation/dedup.py
    before issue #22, the tests' oracle since; the oracle imports this checkout's `curation` package)."""
    import importlib.util

    path = checkout / "curation" / "dedup.py"
    if "def find_duplicates" not in path.read_text():
        path = checkout / "tests" / "curation" / "oracle.py"
    spec = importlib.util.spec_from_file_location(f"dedup_{checkout.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.find_duplicates


def _replay(find_duplicates, data: pd.DataFrame, decided: pd.DataFrame) -> tuple[int, int]:
    """(candidates whose replayed dup_of equals `decided`'s, candidates): candidates are `data`'s rows
    that passed everything but dedup (kept or duplicate); demo profile: sha256 + pHash radius 4."""
    c = data[(data["status"] == "kept") | (data["reason"] == "duplicate")].sort_values("key")
    keys = c["key"].tolist()
    found = find_duplicates(
        keys, (c["width"] * c["height"]).astype(int).tolist(), c["sha256"].tolist(), c["phash"].tolist(), None, 4, None
    )
    want = decided.set_index("key")["dup_of"].fillna("").to_dict()
    return sum(found.get(k, "") == want.get(k, "") for k in keys), len(keys)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--urls", type=int, default=10000)
    ap.add_argument("--bases", type=int, default=2500)
    ap.add_argument("--before", default="6dd0690", help="the earlier checkout (git revision)")
    args = ap.parse_args()
    from demo.serve import ImageServer

    photos = real_photos()
    tmp = Path(tempfile.mkdtemp(prefix="bench-before-after-"))
    before = tmp / "before"
    try:
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(before), args.before], cwd=ROOT, check=True, capture_output=True
        )
        images = REAL.parent / f"variants-{args.bases}"
        names = variants(images, photos, args.bases)
        mb = sum((images / n).stat().st_size for n in names) / 1e6
        with ImageServer(images) as srv:
            urls = [f"{srv.url}/{names[i % len(names)]}?i={i}" for i in range(args.urls)]
            pq.write_table(
                pa.table({"url": urls, "caption": [f"photo {i}" for i in range(args.urls)]}), tmp / "urls.parquet"
            )
            sides = {
                "before": side(before, tmp / "urls.parquet", tmp / "out-before"),
                "after": side(ROOT, tmp / "urls.parquet", tmp / "out-after"),
            }
        rules = {"before": _rule(before), "after": _rule(ROOT)}
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, check=False)
        shutil.rmtree(tmp, ignore_errors=True)

    cols = ["status", "reason", "dup_of"]
    a, b = (sides[k]["manifest"].set_index("url").sort_index()[cols].fillna("") for k in ("before", "after"))
    differ = int((a != b).any(axis=1).sum()) if a.index.equals(b.index) else -1
    # each side's dedup rule replayed on the other side's candidates: are the differences the rule's?
    replay = {
        (rule, data): _replay(rules[rule], sides[data]["manifest"], sides[rule]["manifest"])
        for rule in sides
        for data in sides
    }
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    lines = [
        "## Curation on real photos with duplicates, before and after (`benchmarks/curation_before_after.py`)",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, 1-min load average at the end "
        f"{os.getloadavg()[0]:.1f}. Command: `python -m benchmarks.curation_before_after --urls {args.urls} "
        f"--bases {args.bases} --before {args.before}` (after = {rev.strip()} with its working tree). "
        f"{args.urls} URLs over {len(names)} files ({mb:.0f} MB): {args.bases} crops of {len(photos)} real "
        f"photos + a near copy of every third; demo profile (tiny CLIP), {PROCESSES} download processes x "
        f"{THREADS} threads, one loopback server, one run per side.",
        "",
        "| side | end to end (s) | download + score (s) | decide (s) | write (s) | driver peak RSS (MiB) | "
        "process tree peak RSS (MiB) | kept | duplicate |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, s in sides.items():
        sec, st = s["stats"]["seconds"], s["stats"]
        lines.append(
            f"| {name} ({args.before if name == 'before' else rev.strip()}) | {s['wall']:.1f} | "
            f"{sec['download_score']:.1f} | {sec['decide']:.1f} | {sec['write']:.1f} | {s['top']:.0f} | "
            f"{s['tree']:.0f} | {st['kept']} | {st['reason'].get('duplicate', 0)} |"
        )
    same = sides["before"]["images"] == sides["after"]["images"]
    lines += [
        "",
        "Each side's dedup rule (`find_duplicates` of its checkout, in one process) replayed on the images "
        "each side found that passed everything but dedup; URLs whose dup_of / kept decision matches the "
        "side whose rule was used:",
        "",
        "| rule of | on the candidates of before | on the candidates of after |",
        "| --- | ---: | ---: |",
    ]
    for rule in sides:
        lines.append(
            f"| {rule} | " + " | ".join(f"{replay[(rule, d)][0]} / {replay[(rule, d)][1]}" for d in sides) + " |"
        )
    lines += [
        "",
        f"Manifests: {'identical' if differ == 0 else f'{differ} URLs differ'} in status, reason and "
        f"dup_of over {args.urls} URLs. Kept images (tar member names and bytes, in order): "
        f"{'identical' if same else 'different'} ({len(sides['after']['images'])} images).",
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
