"""Download with img2dataset, one shard per Ray task, safely and politely; failures become reason codes.

The URL list is cut into input shards of `download.shard_size` rows by inputs.py
(`_work/input/NNNNN.parquet`, carried columns included). A download shard runs
img2dataset's own `Downloader` (what its Ray distributor runs per shard) with originals kept
(`resize_mode="no"`, `disable_all_reencoding`); only http(s) URLs reach it, the rest are
`invalid_url`. A shard is done once its `NNNNN_reasons.parquet` exists (each failed URL's reason
code, written after img2dataset's own files; checked by its exact name), so a rerun skips it.

The download folder is on disk or in a bucket (a storage Loc): img2dataset writes its tar, parquet and
stats through fsspec itself (given this run's storage options as fsspec's defaults), each object
appearing whole when its writer closes; a killed shard's leftovers are overwritten by the rerun.

img2dataset stays the downloader (its threads, writer, stats and resumption), but each worker
process replaces the one function its threads call per row, `download_image_with_retry`, with
`hosts.Scheduler.take`: the address guard, size and time caps and opt-outs of `fetch.fetch`,
meaningful retries, robots.txt, and per-host turns that never hold a thread (see hosts.py).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import json
import math
import shutil
import sys
import tarfile
import tempfile
import threading
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa

from common.config import DownloadConfig
from curation import fetch, guard, hosts
from shards import atomic, curated, reasons, storage
from shards.errors import DISK_FULL, SigmaError, disk_full

URL_COL = "url"
I2D_KEY = "sf_key"  # our key, carried through img2dataset as an extra column


def invalid_url(url) -> bool:
    """True unless an http(s) URL with a host."""
    if not isinstance(url, str):
        return True
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return True
    return parts.scheme.lower() not in ("http", "https") or not parts.hostname


# ---------------------------------------------------------------------------------------------
# One download shard
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Crawl:
    """How one download shard crawls (from `curation.download`, see `crawl_of`)."""

    policy: fetch.Policy
    threads: int
    retries: int
    per_domain_limit: int  # requests in flight per host, node-wide
    max_retry_after: float
    robots_txt: bool


def crawl_of(d: DownloadConfig) -> Crawl:
    """The plain values a download shard needs from the config (checked there at load)."""
    tokens = tuple(t for t in (d.user_agent_token, "img2dataset") if t)
    policy = fetch.Policy(
        user_agent=user_agent(d.user_agent_token, d.contact),
        timeout=d.timeout,
        max_seconds=d.max_seconds,
        max_bytes=d.max_bytes,
        allow=guard.networks(d.allow_networks),
        tokens=tokens,
        directives=frozenset(x.lower() for x in d.disallowed_header_directives),
    )
    return Crawl(policy, d.threads, d.retries, d.per_domain_limit, d.max_retry_after, d.robots_txt)


def user_agent(token: str | None, contact: str | None) -> str:
    """`SigmaForge/VERSION (+CONTACT; TOKEN; img2dataset)`: who we are and how to reach the operator."""
    from importlib import metadata

    try:
        version = metadata.version("sigmaforge")
    except metadata.PackageNotFoundError:
        version = "dev"
    about = "; ".join(x for x in (f"+{contact}" if contact else None, token, "img2dataset") if x)
    return f"SigmaForge/{version} ({about})"


_shard_lock = threading.Lock()  # one download shard at a time per process: the hook below serves it
_current: list = [None]
_robots_rules: dict = {}  # origin -> robots.Rules, kept for the life of the worker process


def _install_hook() -> None:
    """Route img2dataset's per-row fetch (a module global its threads look up) to the current scheduler."""
    from img2dataset import downloader

    if getattr(downloader.download_image_with_retry, "_sigmaforge", False):
        return
    original = downloader.download_image_with_retry

    def scheduled(row, *args, **kwargs):
        return _current[0].take() if _current[0] is not None else original(row, *args, **kwargs)

    scheduled._sigmaforge = True
    downloader.download_image_with_retry = scheduled


Place = str | Path | storage.Loc


def _loc(p: Place) -> storage.Loc:
    return p if isinstance(p, storage.Loc) else storage.resolve(p)


def slots_file(folder: Place) -> Path:
    """The host-slot lock file shared by this run's download processes on this node (local disk: Ray's
    session folder inside a Ray worker, else the temp folder)."""
    tag = hashlib.sha1(str(_loc(folder)).encode()).hexdigest()[:12]
    return _node_temp() / "sigmaforge-hosts" / f"{tag}.lock"


def _node_temp() -> Path:
    """Ray's session folder on this node inside a Ray worker (removed with Ray's temp folders), else TMPDIR."""
    import ray

    # no public API names the session folder; Ray removes it with its temp folders
    node = getattr(ray._private.worker, "_global_node", None) if ray.is_initialized() else None
    return Path(node.get_session_dir_path()) if node is not None else Path(tempfile.gettempdir())


def stats_path(folder: Place, shard: int) -> storage.Loc:
    return _loc(folder) / f"{shard:05d}_stats.json"


def reasons_path(folder: Place, shard: int) -> storage.Loc:
    """`NNNNN_reasons.parquet`: (sf_key, reason) of each URL our fetch ended without bytes; last file
    of a download shard, so it marks the shard done."""
    return _loc(folder) / f"{shard:05d}_reasons.parquet"


@contextlib.contextmanager
def _fsspec_defaults(folder: storage.Loc) -> Iterator[None]:
    """img2dataset opens its output URLs through fsspec itself: this run's storage options (endpoint,
    region, profile; never credentials) become fsspec's defaults for the scheme meanwhile."""
    if folder.is_local:
        yield
        return
    import fsspec.config

    protocol = storage.BACKENDS[folder.scheme][0]
    before = fsspec.config.conf.get(protocol)
    fsspec.config.conf[protocol] = storage.fsspec_kwargs(folder.scheme, folder.options)
    try:
        yield
    finally:
        if before is None:
            fsspec.config.conf.pop(protocol, None)
        else:
            fsspec.config.conf[protocol] = before


def download_shard(input_shard: Place, folder: Place, shard: int, crawl: Crawl) -> None:
    """Run img2dataset on one input shard's http(s) URLs into `folder/NNNNN.{tar,parquet}` + stats,
    then the reason codes of the URLs that failed."""
    folder = _loc(folder)
    if reasons_path(folder, shard).has_file():
        return
    folder.mkdir()
    table = storage.read_parquet(_loc(input_shard), columns=["key", URL_COL])
    valid = pa.array([i for i, u in enumerate(table[URL_COL].to_pylist()) if not invalid_url(u)], pa.int64())
    todo = pa.table({URL_COL: table[URL_COL].take(valid), I2D_KEY: table["key"].take(valid)})
    # img2dataset reads its input from a local file and deletes it when the shard is done; beside the
    # download on disk, in a temp folder of this node for a bucket
    scratch = None if folder.is_local else Path(tempfile.mkdtemp(prefix=f".{shard:05d}.", dir=_node_temp()))
    feather = (folder.local if scratch is None else scratch) / f".{shard:05d}.input.feather"
    try:
        _download(todo, feather, folder, shard, crawl, len(table))
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _download(todo: pa.Table, feather: Path, folder: storage.Loc, shard: int, crawl: Crawl, n_rows: int) -> None:
    """img2dataset's Downloader over `todo` (written to `feather` first), then the reasons file."""
    from img2dataset.downloader import Downloader
    from img2dataset.resizer import Resizer
    from img2dataset.writer import WebDatasetSampleWriter

    with atomic.atomic_path(feather) as tmp, pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, todo.schema) as w:
        w.write_table(todo)  # atomic_path: a full disk here is one line naming the file, like every write
    resizer = Resizer(image_size=0, resize_mode="no", resize_only_if_bigger=False, disable_all_reencoding=True)
    downloader = Downloader(
        sample_writer_class=WebDatasetSampleWriter,
        resizer=resizer,
        thread_count=crawl.threads,
        save_caption=False,
        extract_exif=False,
        output_folder=folder.url,
        column_list=[URL_COL, I2D_KEY],
        timeout=crawl.policy.timeout,
        number_sample_per_shard=max(10, n_rows),
        oom_shard_count=5,
        compute_hash=None,
        verify_hash_type=None,
        encode_format="jpg",
        retries=crawl.retries,
        user_agent_token=None,
        disallowed_header_directives=None,  # both applied by fetch.fetch
    )
    if len(_robots_rules) > 100_000:
        _robots_rules.clear()
    scheduler = hosts.Scheduler(
        todo[URL_COL].to_pylist(),
        crawl.policy,
        hosts.Slots(slots_file(folder), crawl.per_domain_limit),
        crawl.retries,
        crawl.max_retry_after,
        crawl.robots_txt,
        _robots_rules,
    )
    _install_hook()
    error, trace = None, ""
    with _shard_lock:
        _current[0] = scheduler
        try:
            with (
                contextlib.redirect_stdout(io.StringIO()) as said,
                contextlib.redirect_stderr(said),
                _fsspec_defaults(folder),
            ):
                try:  # not img2dataset's __call__, which prints the error and returns False
                    downloader.download_shard((shard, str(feather)))
                except Exception as e:  # noqa: BLE001 - judged below: a full disk, or a bug
                    error, trace = e, traceback.format_exc()
                    e.__traceback__ = None  # its frames hold img2dataset's open tar: closed here, quietly
                    gc.collect()
        finally:
            _current[0] = None
    if error is not None:
        if isinstance(error, OSError) and error.errno in DISK_FULL:  # the user's to fix
            raise SigmaError(disk_full(folder.url)) from None
        print(said.getvalue() + trace, file=sys.stderr)
        raise RuntimeError(
            f"img2dataset failed on download shard {shard:05d}: "
            f"{scheduler.failure or f'{type(error).__name__}: {error}'}"
        )
    keys = todo[I2D_KEY].to_pylist()
    rows = sorted(scheduler.reasons.items())
    table = pa.table(
        {
            I2D_KEY: pa.array([keys[i] for i, _ in rows], pa.string()),
            "reason": pa.array([r for _, r in rows], pa.string()),
        }
    )
    atomic.write_parquet(reasons_path(folder, shard), table)


# ---------------------------------------------------------------------------------------------
# Reading a finished download shard back
# ---------------------------------------------------------------------------------------------


def iter_shard(input_shard: Place, folder: Place, shard: int) -> Iterator[dict]:
    """One dict per input row: key, url, reason ("" if downloaded), and where the served bytes lie
    in the download tar (src: its path or URL, offset, size; read them with `shards.curated.read_member`).
    Only tar headers are read here: the bytes are read where they are decoded, in another Ray task.
    """
    folder = _loc(folder)
    inputs = storage.read_parquet(_loc(input_shard), columns=["key", URL_COL])
    urls = dict(zip(inputs["key"].to_pylist(), inputs[URL_COL].to_pylist()))
    status: dict[str, dict] = {}
    meta_file = folder / f"{shard:05d}.parquet"
    if meta_file.has_file():
        for r in storage.read_parquet(meta_file, columns=[I2D_KEY, "key", "status"]).to_pylist():
            status[r[I2D_KEY]] = r
    why = {}  # our fetch's reason codes; anything else img2dataset reported is download_error
    if reasons_path(folder, shard).has_file():
        t = storage.read_parquet(reasons_path(folder, shard))
        why = dict(zip(t[I2D_KEY].to_pylist(), t["reason"].to_pylist()))
    i2d_to_ours = {r["key"]: k for k, r in status.items() if r["status"] == "success"}
    seen: set[str] = set()
    tar_path = folder / f"{shard:05d}.tar"
    if tar_path.has_file():
        with _tar_headers(tar_path) as tar:  # headers only, the data is skipped
            for m in tar:
                stem, ext = curated.split_name(m.name)
                ours = i2d_to_ours.get(stem)
                if ext != "jpg" or ours is None or ours in seen:
                    continue
                seen.add(ours)
                yield {
                    "key": ours,
                    URL_COL: urls[ours],
                    "reason": "",
                    "src": tar_path.url,
                    "offset": m.offset_data,
                    "size": m.size,
                }
    for key, url in urls.items():
        if key in seen:
            continue
        if invalid_url(url):
            reason = reasons.INVALID_URL
        elif key in status and status[key]["status"] != "success":
            reason = why.get(key, reasons.DOWNLOAD_ERROR)
        else:
            reason = reasons.DOWNLOAD_ERROR  # img2dataset lost it (a crashed shard)
        yield {
            "key": key,
            URL_COL: url if isinstance(url, str) else "",
            "reason": reason,
            "src": "",
            "offset": 0,
            "size": 0,
        }


@contextlib.contextmanager
def _tar_headers(tar: storage.Loc) -> Iterator[tarfile.TarFile]:
    """A download tar opened to walk its headers: random access on disk; on a bucket a stream read in
    small blocks, so skipping an image's bytes skips its GET too (one ranged GET per block of headers)."""
    if tar.is_local:
        with tarfile.open(tar.path, "r:") as t:
            yield t
        return
    with tar.open("rb", block_size=HEADER_BLOCK) as f, tarfile.open(fileobj=f, mode="r:") as t:
        yield t


HEADER_BLOCK = 1 << 16  # bytes per ranged GET while walking a bucket tar's headers (a 512-byte header + small images)


def shard_stats(folder: Place, n_shards: int | None = None) -> dict:
    """img2dataset's per-shard stats, summed: count, successes, failed_to_download, ... and statuses.
    With `n_shards`, the stats files are found by their exact names (a bucket's listing may lag)."""
    total: dict = {
        "count": 0,
        "successes": 0,
        "failed_to_download": 0,
        "failed_to_resize": 0,
        "duration": 0.0,
        "status_dict": {},
    }
    folder = _loc(folder)
    if n_shards is None:
        files = folder.glob("*_stats.json")
    else:
        files = [p for p in (stats_path(folder, i) for i in range(n_shards)) if p.has_file()]
    for p in files:
        s = json.loads(p.read_text())
        for k in ("count", "successes", "failed_to_download", "failed_to_resize", "duration"):
            total[k] += s.get(k, 0) or 0
        for k, v in (s.get("status_dict") or {}).items():
            total["status_dict"][k] = total["status_dict"].get(k, 0) + v
    total["shards"] = len(files)
    total["duration"] = round(total["duration"], 3) if not math.isnan(total["duration"]) else None
    return total
