"""The training summary page: `RUNDIR/summary.html` with the loss curves and the latest sample grids.

A RUNDIR written by training/finetune.py holds `tb/` (TensorBoard events), `log.txt` (one line per
`log_every` steps), `samples/step-NNNNNNN.png` (the fixed-prompt grid) and `run.json`. The page
reads the scalars from the TensorBoard events, or from `log.txt` when there are none, and shows
one plot per scalar and the latest grid. Given the parent of several stage folders
(`<training.out>`: runs/256, runs/512, ...) it shows every stage: one series per stage in each
plot, and the latest grid per stage. Self-contained: opens from disk, copied off a cluster.
RUNDIR may be on an object store (a `shards.storage.Loc` or an `s3://...` URL): its files are read
through the storage layer, the event files downloaded into a temp folder to be parsed
(training/runfolder.py says how a store run writes log.txt and tb/).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from common import pages
from shards import atomic, storage
from shards.errors import SigmaError
from shards.storage import Loc

SUMMARY = "summary.html"
# (tag, title, log-scale y): what finetune.py writes to TensorBoard
SCALARS = [
    ("train/loss", "Loss", True),
    ("train/lr", "Learning rate", False),
    ("train/grad_norm", "Gradient norm (before clipping)", True),
    ("perf/samples_per_s", "Throughput (samples/s)", False),
    ("perf/step_time_s", "Step time (s)", False),
]
LOG = "log.txt"
# log.txt's step lines, written by `log_line` and read by `parse_log_line` (this module owns the format):
#   step 20/100 loss 0.123456 lr 1.000e-04 grad_norm 0.5000 samples/s 12.3 step_time 0.160s
LOG_FIELDS = [
    ("loss", "train/loss", "{:.6f}"),
    ("lr", "train/lr", "{:.3e}"),
    ("grad_norm", "train/grad_norm", "{:.4f}"),
    ("samples/s", "perf/samples_per_s", "{:.1f}"),
    ("step_time", "perf/step_time_s", "{:.3f}s"),
]
LOG_LINE = re.compile(r"^step (\d+)/\d+ (.*)$")
LOG_PAIR = re.compile(r"(\S+) ([-+0-9.eE]+|nan|inf)s?(?=\s|$)")


def log_line(step: int, total: int, values: dict[str, float]) -> str:
    """One log.txt line from {TensorBoard tag: value}; `captions/<set>` shares (how often each caption
    set was drawn since the last line) follow the fixed fields."""
    pairs = [f"{name} {fmt.format(values[tag])}" for name, tag, fmt in LOG_FIELDS if tag in values]
    pairs += [f"{tag} {v:.3f}" for tag, v in values.items() if tag.startswith("captions/")]
    return f"step {step}/{total} " + " ".join(pairs)


def parse_log_line(line: str) -> tuple[int, dict[str, float]] | None:
    """(step, {tag: value}) of a log_line, None for any other line."""
    m = LOG_LINE.match(line.strip())
    if not m:
        return None
    tags = {name: tag for name, tag, _ in LOG_FIELDS}
    return int(m.group(1)), {tags[n]: float(v) for n, v in LOG_PAIR.findall(m.group(2)) if n in tags}


STEP = re.compile(r"(\d+)")


def _place(folder: str | os.PathLike[str] | Loc) -> Path | Loc:
    """A Loc stays one, a bucket URL becomes its Loc, a local path stays a Path."""
    if isinstance(folder, Loc):
        return folder
    loc = storage.resolve(folder)
    return Path(folder) if loc.is_local else loc


def is_run(folder: Path | Loc) -> bool:
    return any((folder / name).exists() for name in ("tb", "log.txt", "samples"))


def stage_runs(rundir: Path | Loc) -> dict[str, Path | Loc]:
    """{stage name: folder}: RUNDIR itself if it is a run, else its run subfolders in chain order."""
    folders = [rundir] if is_run(rundir) else [p for p in rundir.iterdir() if p.is_dir() and is_run(p)]
    infos = {p: run_info(p) for p in folders}
    order = sorted(folders, key=lambda p: (len(infos[p].get("chain", [])) or 99, p.name))
    return {str(infos[p].get("stage", p.name)): p for p in order}


def run_info(folder: Path | Loc) -> dict:
    """The run's run.json (stage, chain, ...); {} when absent or unreadable."""
    try:
        info = json.loads((folder / "run.json").read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def read_scalars(folder: str | os.PathLike[str] | Loc) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} from TensorBoard events under folder/tb, else from folder/log.txt."""
    folder = _place(folder)
    tb = folder / "tb"
    events = tb.glob("**/events.out.tfevents.*") if tb.is_dir() else []
    if events:
        with tempfile.TemporaryDirectory(prefix="sigmaforge-tb-") as tmp:
            local = str(tb)
            if isinstance(tb, Loc) and not tb.is_local:  # a store's event files, parsed from a local copy
                local = tmp
                for e in events:
                    dest = Path(tmp) / e.relative_to(tb)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    e.download(dest)
            return _event_scalars(local)
    out: dict[str, list[tuple[int, float]]] = {}
    log = folder / LOG
    for line in log.read_text().splitlines() if log.is_file() else []:
        parsed = parse_log_line(line)
        if parsed:
            for tag, value in parsed[1].items():
                out.setdefault(tag, []).append((parsed[0], value))
    return out


def _event_scalars(tb: str) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb, size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def latest_grid(folder: Path | Loc) -> tuple[int, Path | Loc] | None:
    """(step, path) of the newest sample grid: the highest step number in samples/*.png."""
    grids = [(int(m.group(1)), p) for p in (folder / "samples").glob("*.png") if (m := STEP.search(p.stem))]
    return max(grids) if grids else None


def _plot(tag: str, title: str, log_y: bool, series: dict[str, list[tuple[int, float]]]) -> str:
    fig = pages.new_figure()
    ax = fig.add_subplot()
    for stage, points in series.items():
        if points:
            steps, values = zip(*sorted(points))
            ax.plot(steps, values, marker="." if len(points) < 50 else None, label=stage)
    if log_y and all(v > 0 for pts in series.values() for _, v in pts):
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.legend(fontsize=8, title="stage")
    return pages.plot(tag.replace("/", "-"), pages.figure_uri(fig), title)


def build(rundir: str | os.PathLike[str] | Loc) -> str:
    """The summary's HTML for a stage RUNDIR or a folder of stage runs (on disk or a store)."""
    rundir = _place(rundir)
    runs = stage_runs(rundir)
    if not runs:
        raise SigmaError(f"{rundir}: no training run here (expected tb/, log.txt or samples/)")
    scalars = {stage: read_scalars(folder) for stage, folder in runs.items()}
    rows = []
    for stage, tags in scalars.items():
        loss = tags.get("train/loss", [])
        speed = [v for _, v in tags.get("perf/samples_per_s", [])]
        rows.append(
            (
                stage,
                max((s for s, _ in loss), default="-"),
                f"{loss[-1][1]:.6g}" if loss else "-",
                f"{min(v for _, v in loss):.6g}" if loss else "-",
                f"{sum(speed) / len(speed):.1f}" if speed else "-",
            )
        )
    known = [t for t, _, _ in SCALARS]
    extra = sorted({t for tags in scalars.values() for t in tags} - set(known))
    plots = [
        _plot(tag, title, log_y, {s: tags.get(tag, []) for s, tags in scalars.items()})
        for tag, title, log_y in SCALARS + [(t, t, False) for t in extra]
        if any(tag in tags for tags in scalars.values())
    ]
    grids = []
    for stage, folder in runs.items():
        latest = latest_grid(folder)
        if latest is None:
            grids.append(
                f'<section class="grid" data-stage="{pages.esc(stage)}"><h3>{pages.esc(stage)}</h3>'
                '<p class="muted">no sample grid yet</p></section>'
            )
            continue
        step, path = latest
        grids.append(
            f'<section class="grid" data-stage="{pages.esc(stage)}" data-step="{step}">'
            f"<h3>{pages.esc(stage)}: step {step:,} ({pages.esc(path.name)})</h3>"
            f'<img alt="{pages.esc(stage)} step {step}" style="max-width:100%" '
            f'src="{pages.data_uri(path.read_bytes(), "image/png")}"></section>'
        )
    body = [
        f'<p class="muted">{pages.esc(rundir if isinstance(rundir, Loc) else rundir.resolve())}</p>',
        "<h2>Stages</h2>",
        pages.table(["stage", "last step", "last loss", "min loss", "mean samples/s"], rows, "stages"),
        "<h2>Curves</h2>",
        f'<div class="plots">{"".join(plots) or "<p>No scalars logged yet.</p>"}</div>',
        "<h2>Latest sample grids</h2>",
        "".join(grids),
    ]
    return pages.page(f"Training summary: {rundir.name}", "\n".join(body))


def write_summary(rundir: str | os.PathLike[str] | Loc) -> Path | Loc:
    """Write RUNDIR/summary.html atomically (one PUT on a store); returns its path."""
    out = _place(rundir) / SUMMARY
    atomic.write_text(out, build(rundir))
    return out
