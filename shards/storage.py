"""Every path a user gives, through one place: a local path or a bucket URL, opened, listed, globbed and
written through fsspec.

    loc = storage.resolve("s3://bucket/cur", cfg.storage)   # once, at the entry point
    (loc / "shards" / "00000.tar").read_range(512, 1024)    # anywhere below, in a Ray task too

Schemes: local paths and `file://` (the disk), `s3://` (s3fs, installed with the project), `gs://`/`gcs://`
(gcsfs) and `az://`/`abfs://`/`abfss://` (adlfs), the last two as optional extras (`pip install -e
'.[gcs]'` / `'.[azure]'`): they go through the same code, but only s3 is tested here, against a real S3 API
on loopback (moto's server). Any other scheme (`hf://`, `http(s)://`, `memory://`, ...) is refused in one
line, and so is a path that looks like a URL whose `//` was lost (`s3:/bucket`), never taken for a folder.

A `Loc` is a small picklable handle (scheme, path, the scheme's storage options): Ray tasks receive it
as it is and each process builds its own client from the options. Credentials are never in it: the
client finds them the way the store's own tools do (AWS_* environment variables including
AWS_ENDPOINT_URL, ~/.aws config and profiles, instance and pod roles; GOOGLE_APPLICATION_CREDENTIALS;
Azure's environment), so `str(loc)`, which is the URL as typed, is safe in messages, manifests and
fingerprints.

Commit rule (buckets have no rename): a finished file appears whole. On disk: a temp file beside it,
then os.replace (shards/atomic.py). On a bucket: one PUT, or a multipart upload completed at close and
aborted if the writer fails. A finished multi-file output (a folder) is committed by a marker object
written last, `MARKER` inside it, found by its exact name (a HEAD request, never a listing, which some
S3-compatible stores serve late); on disk the folder is still built beside and renamed into place, and
gets the marker too, so folders made before markers existed still count as finished.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from shards.errors import DISK_FULL, SigmaError, disk_full

MARKER = "_COMMITTED"  # written last into a finished multi-file output folder

# scheme -> (fsspec protocol, the package that provides it)
BACKENDS = {
    "s3": ("s3", "s3fs"),
    "s3a": ("s3", "s3fs"),
    "gs": ("gcs", "gcsfs"),
    "gcs": ("gcs", "gcsfs"),
    "az": ("abfs", "adlfs"),
    "abfs": ("abfs", "adlfs"),
    "abfss": ("abfs", "adlfs"),
}
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", re.S)
_LOST_SLASH = re.compile(r"^(s3a?|gs|gcs|az|abfss?|file|hf|https?):/(?!/)", re.I)
_GLOB = re.compile(r"[*?\[]")
# storage option keys that would carry a secret: never taken from pipelines.yaml (it is copied and printed)
_SECRET = re.compile(r"key|secret|token|password|credential|sas|connection", re.I)


def _hashable(options: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted((k, v) for k, v in options.items() if v is not None))


def resolve(text: str | os.PathLike[str], options: Any = None) -> Loc:
    """A user's path or URL as a Loc. `options`: the `storage` config section (or a {scheme: {...}} dict):
    endpoint, region, anonymous access per scheme. Raises SigmaError for a scheme this layer refuses, a
    backend that is not installed, or a path whose `//` was lost."""
    text = os.fspath(text)
    if _LOST_SLASH.match(text):
        raise SigmaError(f"{text}: looks like a URL with its '//' lost (write {text.replace(':/', '://', 1)})")
    m = _URL.match(text)
    if m is None:
        return Loc("", os.path.abspath(os.path.expanduser(text)))
    scheme, rest = m.group(1).lower(), m.group(2)
    if scheme == "file":
        return Loc("", os.path.abspath(rest or "/"))
    if scheme not in BACKENDS:
        supported = ", ".join(f"{s}://" for s in ("s3", "gs", "az", "abfs", "file"))
        raise SigmaError(f"{text}: the scheme {scheme}:// is not supported here (use a local path or {supported})")
    protocol, package = BACKENDS[scheme]
    try:
        __import__(package)
    except ImportError:
        raise SigmaError(f"{text}: {scheme}:// needs the package {package} (pip install {package})") from None
    rest = rest.strip("/")
    if not rest:
        raise SigmaError(f"{text}: no bucket named")
    return Loc(scheme, rest, _hashable(_scheme_options(options, protocol)))


def _scheme_options(options: Any, protocol: str) -> dict[str, Any]:
    """The config's options for one protocol, as a flat dict (None values dropped)."""
    if options is None:
        return {}
    section = {"s3": "s3", "gcs": "gs", "abfs": "az"}[protocol]
    raw = options.get(section) if isinstance(options, Mapping) else getattr(options, section, None)
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raw = {f: getattr(raw, f) for f in raw.__dataclass_fields__}
    for k in raw:
        if _SECRET.search(k):
            raise SigmaError(f"storage.{section}.{k}: credentials do not belong in the config (use the environment)")
    return {k: v for k, v in raw.items() if v is not None}


def _filesystem(scheme: str, options: tuple[tuple[str, Any], ...]) -> Any:
    """One fsspec client per (scheme, options) per process: a forked child (a DataLoader worker) makes its
    own, as fsspec's async clients refuse to run after a fork."""
    return _client(os.getpid(), scheme, options)


@functools.lru_cache(maxsize=16)
def _client(pid: int, scheme: str, options: tuple[tuple[str, Any], ...]) -> Any:
    import fsspec

    fs = fsspec.filesystem(BACKENDS[scheme][0], **fsspec_kwargs(scheme, options))
    if BACKENDS[scheme][0] == "s3":
        # s3fs' own retry loops around a request (5 tries, nested for reads) multiply botocore's attempts: a
        # store gone took ~100 requests and 24 s to report with 1 attempt, minutes with 10. One more try
        # each still covers a response body cut short, which botocore does not retry.
        fs.retries = 2
    return fs


# --- retries, counted ------------------------------------------------------------------------------
# botocore retries a throttled request (SlowDown, 503, 429), a server error and a dropped connection with
# backoff (storage.s3.retries attempts, adaptive mode). Each retry is counted by its cause in the process
# that makes it, through botocore's own events on every S3 client made in the process (s3fs' here and
# img2dataset's): `needs-retry` sees why an attempt failed, `request-created` of the next attempt is the
# retry. A Ray worker sends its counts to one small actor per job, made by the first retry (nothing at all
# when nothing is retried); a stage's driver reads and resets the sum with `take_retries`.
RETRY_KINDS = ("throttled", "server_errors", "dropped")
_THROTTLED = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests"}
_FAULT = "sigmaforge_fault"  # the failed attempt's cause, kept in botocore's request context until its retry
_retries: dict[str, int] = dict.fromkeys(RETRY_KINDS, 0)  # this process's, while it is not in a Ray job
_forked = [False]  # a forked child (a DataLoader worker) counts here: its parent's Ray is not its to call
os.register_at_fork(after_in_child=lambda: _forked.__setitem__(0, True))


def _on_attempt(request_dict: dict[str, Any], response: Any = None, caught_exception: Any = None, **_: Any) -> None:
    """botocore `needs-retry`: note why this attempt failed, if it is a cause botocore retries."""
    kind = None
    if caught_exception is not None:
        kind = "dropped"  # a connection reset or closed, a timeout
    elif response is not None:
        status, code = response[0].status_code, response[1].get("Error", {}).get("Code")
        if status in (429, 503) or code in _THROTTLED:
            kind = "throttled"
        elif status >= 500:
            kind = "server_errors"
    if kind is not None:
        request_dict["context"][_FAULT] = kind
    return None  # the decision and the backoff stay botocore's


def _on_request(request: Any, **_: Any) -> None:
    """botocore `request-created`: a request made after a failed attempt is its retry."""
    kind = getattr(request, "context", {}).pop(_FAULT, None)
    if kind is not None:
        _count_retry(kind)


def _count_retry(kind: str) -> None:
    tally = _tally(create=True)
    if tally is None:
        _retries[kind] += 1
    else:
        tally.add.remote(kind)


def _tally(create: bool) -> Any:
    """The Ray job's retry counter (an actor), or None outside Ray (or, without `create`, if none was made).
    The contract layer loads no Ray: it uses the one the process has loaded (a Ray worker, a stage's driver)."""
    ray = sys.modules.get("ray")
    if ray is None or _forked[0] or not ray.is_initialized():
        return None
    name = f"storage-retries-{ray.get_runtime_context().get_job_id()}"
    try:
        return ray.get_actor(name, namespace="sigmaforge")
    except ValueError:
        if not create:
            return None

    class Tally:
        def __init__(self) -> None:
            self.counts = dict.fromkeys(RETRY_KINDS, 0)

        def add(self, kind: str) -> None:
            self.counts[kind] += 1

        def take(self) -> dict[str, int]:
            counts, self.counts = self.counts, dict.fromkeys(RETRY_KINDS, 0)
            return counts

    # detached: it outlives the worker that made it; the driver's take_retries removes it
    actor = ray.remote(num_cpus=0)(Tally).options(
        name=name, namespace="sigmaforge", lifetime="detached", get_if_exists=True
    )
    return actor.remote()


def take_retries() -> dict[str, int]:
    """The retries counted since the last call, by cause, in this process and (in a Ray job) its workers;
    the counts start again from zero. A stage calls it at its start and puts its end's into its stats."""
    counts = dict(_retries)
    _retries.update(dict.fromkeys(RETRY_KINDS, 0))
    tally = _tally(create=False)
    if tally is not None:
        ray = sys.modules["ray"]
        for kind, n in ray.get(tally.take.remote()).items():
            counts[kind] += n
        ray.kill(tally)
    return counts


def retry_stats(out: Loc) -> dict[str, dict[str, int]]:
    """A stage's stats entry `storage_retries` (`take_retries`): always for a bucket `out`, else only if
    something was retried (an input in a bucket), so that a run on disk writes what it wrote before."""
    counts = take_retries()
    return {"storage_retries": counts} if any(counts.values()) or not out.is_local else {}


def _count_retries_of_every_client() -> None:
    """Register the two handlers with botocore's built-in ones: every S3 client made from now on has them."""
    from botocore import handlers

    for spec in (("needs-retry.s3", _on_attempt), ("request-created.s3", _on_request)):
        if spec not in handlers.BUILTIN_HANDLERS:
            handlers.BUILTIN_HANDLERS.append(spec)


def fsspec_kwargs(scheme: str, options: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    """The fsspec filesystem arguments of a Loc's scheme and options (also for libraries that open URLs
    through fsspec themselves, such as img2dataset's writers: `fsspec.config.conf`). No credentials."""
    protocol = BACKENDS[scheme][0]
    o = dict(options)
    kw: dict[str, Any] = {"skip_instance_cache": True}
    if protocol == "s3":
        _count_retries_of_every_client()
        # No listings cache: a marker's HEAD must see the store, not a listing made before it was written.
        kw.update(use_listings_cache=False, anon=bool(o.get("anon", False)))
        if o.get("endpoint_url"):
            kw["endpoint_url"] = o["endpoint_url"]
        if o.get("profile"):
            kw["profile"] = o["profile"]
        client: dict[str, Any] = {}
        if o.get("region"):
            client["region_name"] = o["region"]
        kw["client_kwargs"] = client
        # botocore's adaptive retries: SlowDown / 503 / dropped connections, with backoff
        kw["config_kwargs"] = {"retries": {"max_attempts": int(o.get("retries", 10)), "mode": "adaptive"}}
        if "connect_timeout" in o:
            kw["config_kwargs"]["connect_timeout"] = o["connect_timeout"]
    elif protocol == "gcs":
        if o.get("anon"):
            kw["token"] = "anon"
        for k in ("project", "endpoint_url"):
            if o.get(k):
                kw[k] = o[k]
    else:
        kw["anon"] = bool(o.get("anon", False)) or None
        if o.get("account_name"):
            kw["account_name"] = o["account_name"]
    return kw


@dataclass(frozen=True)
class Loc:
    """A place: `scheme` "" and an absolute `path` on disk, or a scheme and "bucket/key"."""

    scheme: str
    path: str
    options: tuple[tuple[str, Any], ...] = field(default=(), repr=False)

    # --- names ---------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return self.path if not self.scheme else f"{self.scheme}://{self.path}"

    def __str__(self) -> str:
        return self.url

    def __fspath__(self) -> str:
        """Only a local Loc is a filesystem path: `open(loc)` on a bucket URL would make a folder named `s3:`."""
        if self.scheme:
            raise SigmaError(f"{self.url}: this step reads local files only")
        return self.path

    def __truediv__(self, name: str) -> Loc:
        name = name.strip("/")
        if not name:
            return self
        return Loc(self.scheme, self.path.rstrip("/") + "/" + name, self.options)

    @property
    def is_local(self) -> bool:
        return not self.scheme

    @property
    def local(self) -> Path:
        """The Path of a local Loc (raises for a bucket: callers that need a disk check is_local first)."""
        return Path(os.fspath(self))

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        return os.path.splitext(self.name)[1]

    @property
    def stem(self) -> str:
        return os.path.splitext(self.name)[0]

    @property
    def parent(self) -> Loc:
        head = self.path.rstrip("/").rsplit("/", 1)[0]
        if self.scheme and "/" not in self.path.strip("/"):
            return self  # a bucket's parent is itself
        return Loc(self.scheme, head or "/", self.options)

    @property
    def fs(self) -> Any:
        """The fsspec filesystem (a local one for disk paths)."""
        if not self.scheme:
            import fsspec

            return fsspec.filesystem("file")
        return _filesystem(self.scheme, self.options)

    def relative_to(self, other: Loc) -> str:
        base = other.path.rstrip("/") + "/"
        if self.scheme != other.scheme or not self.path.startswith(base):
            raise ValueError(f"{self} is not under {other}")
        return self.path[len(base) :]

    def is_under(self, other: Loc) -> bool:
        """Whether self is other or inside it (overlap checks between inputs and --out)."""
        if self.scheme != other.scheme:
            return False
        a, b = self.path.rstrip("/"), other.path.rstrip("/")
        return a == b or a.startswith(b + "/")

    # --- reading -------------------------------------------------------------------------------
    def exists(self) -> bool:
        if not self.scheme:
            return os.path.exists(self.path)
        return bool(self.fs.exists(self.path))

    def has_file(self) -> bool:
        """Whether this exact file exists: on a bucket one HEAD request, never a listing (some S3-compatible
        stores serve listings late) and no second request for a missing one. What resume decisions check."""
        if not self.scheme:
            return os.path.isfile(self.path)
        if BACKENDS[self.scheme][0] != "s3":
            return bool(self.fs.isfile(self.path))
        bucket, _, key = self.path.partition("/")
        try:
            self.fs.call_s3("head_object", Bucket=bucket, Key=key)
        except FileNotFoundError:
            return False
        return True

    def is_file(self) -> bool:
        if not self.scheme:
            return os.path.isfile(self.path)
        return bool(self.fs.isfile(self.path))

    def is_dir(self) -> bool:
        if not self.scheme:
            return os.path.isdir(self.path)
        return bool(self.fs.isdir(self.path))

    def size(self) -> int:
        if not self.scheme:
            return os.stat(self.path).st_size
        return int(self.fs.size(self.path))

    def info(self) -> dict[str, Any]:
        """Size and what changes when the object changes: {"size", "mtime"} on disk; {"size", "etag"} on a
        bucket (fingerprints: a rewritten object has a new ETag even at the same size)."""
        if not self.scheme:
            st = os.stat(self.path)
            return {"size": st.st_size, "mtime": st.st_mtime_ns}
        return _size_and_tag(self.fs.info(self.path))

    def open(self, mode: str = "rb", **kwargs: Any) -> IO[Any]:
        """Open for reading (a bucket object streams with read-ahead), or for writing with `writer()`."""
        if "w" in mode or "a" in mode:
            raise ValueError("write through storage.writer() or shards.atomic: a half-written object must not appear")
        if not self.scheme:
            return open(self.path, mode, **kwargs)
        return self.fs.open(self.path, mode, **kwargs)  # type: ignore[no-any-return]

    def read_bytes(self) -> bytes:
        if not self.scheme:
            return Path(self.path).read_bytes()
        return bytes(self.fs.cat_file(self.path))

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def read_range(self, offset: int, size: int) -> bytes:
        """`size` bytes at `offset`: one ranged GET on a bucket."""
        if not self.scheme:
            with open(self.path, "rb") as f:
                f.seek(offset)
                return f.read(size)
        return bytes(self.fs.cat_file(self.path, start=offset, end=offset + size))

    def iterdir(self) -> list[Loc]:
        """The folder's entries, sorted by name ([] for a missing folder or prefix)."""
        if not self.scheme:
            try:
                return [self / n for n in sorted(os.listdir(self.path))]
            except (FileNotFoundError, NotADirectoryError):
                return []
        try:
            names = self.fs.ls(self.path, detail=False)
        except FileNotFoundError:
            return []
        base = self.path.rstrip("/")
        return sorted(Loc(self.scheme, n.rstrip("/"), self.options) for n in names if n.rstrip("/") != base)

    def glob(self, pattern: str) -> list[Loc]:
        """Entries below this folder matching `pattern` (fnmatch, `**` for any depth), sorted."""
        if not self.scheme:
            return sorted(self / str(p.relative_to(self.path)) for p in Path(self.path).glob(pattern))
        found = self.fs.glob(self.path.rstrip("/") + "/" + pattern)
        return sorted(Loc(self.scheme, p.rstrip("/"), self.options) for p in found)

    def files(self) -> list[Loc]:
        """Every file below this folder, any depth, sorted by path."""
        if not self.scheme:
            out = []
            for root, dirs, names in os.walk(self.path):
                dirs.sort()
                out += [Loc("", os.path.join(root, n)) for n in names]
            return sorted(out)
        return sorted(Loc(self.scheme, p, self.options) for p in self.fs.find(self.path))

    def download(self, dest: str | os.PathLike[str]) -> None:
        """Copy this object to a local file (a model folder into the model cache, a list to parse)."""
        if not self.scheme:
            shutil.copyfile(self.path, dest)
        else:
            self.fs.get_file(self.path, os.fspath(dest))

    def __lt__(self, other: Loc) -> bool:
        return (self.scheme, self.path) < (other.scheme, other.path)

    # --- writing (whole objects only; shards/atomic.py builds on these) ----------------------------
    def mkdir(self) -> None:
        """Make the folder on disk; a bucket has no folders (a prefix exists once an object is under it)."""
        if not self.scheme:
            os.makedirs(self.path, exist_ok=True)

    def unlink(self) -> None:
        """Remove one file or object; a missing one is fine."""
        with contextlib.suppress(FileNotFoundError):
            if not self.scheme:
                os.unlink(self.path)
            else:
                self.fs.rm_file(self.path)

    def rmtree(self) -> None:
        """Remove a folder or everything under a prefix; a missing one is fine."""
        if not self.scheme:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.path, recursive=True)

    def upload(self, src: str | os.PathLike[str]) -> None:
        """Put a finished local file here as one object (multipart above s3fs' chunk size, completed at the
        end and aborted on failure). On disk: a copy, temp + rename."""
        if not self.scheme:
            with local_temp(self.path) as tmp:
                shutil.copyfile(src, tmp)
            return
        self.fs.put_file(os.fspath(src), self.path)

    def write_object(self, data: bytes) -> None:
        """One PUT of `data` (bucket only; on disk use shards/atomic.write_bytes)."""
        if not self.scheme:
            raise ValueError("write_object is for buckets; use shards.atomic on disk")
        self.fs.pipe_file(self.path, data)


def _size_and_tag(i: Mapping[str, Any]) -> dict[str, Any]:
    """`Loc.info` of a bucket object from fsspec's details (a HEAD's or a listing's: the same ETag)."""
    tag = i.get("ETag") or i.get("etag") or i.get("md5Hash") or i.get("generation") or i.get("mtime")
    size = i.get("size", i.get("ContentLength"))
    return {"size": int(size or 0), "etag": str(tag).strip('"') if tag is not None else None}


def infos(locs: Iterable[Loc]) -> dict[Loc, dict[str, Any]]:
    """`info()` of many files, missing ones left out. In a bucket one LIST per folder (its pages of 1000)
    instead of a HEAD per object; an object the listing lacks (some stores list late) gets its HEAD."""
    out: dict[Loc, dict[str, Any]] = {}
    folders: dict[Loc, list[Loc]] = {}
    for loc in locs:
        folders.setdefault(loc.parent, []).append(loc)
    for folder, group in folders.items():
        listed: dict[str, Any] = {}
        if not folder.is_local and len(group) > 1:
            with contextlib.suppress(FileNotFoundError):
                listed = {e["name"].rstrip("/"): e for e in folder.fs.ls(folder.path, detail=True)}
        for loc in group:
            entry = listed.get(loc.path)
            if entry is not None and entry.get("type") == "file":
                out[loc] = _size_and_tag(entry)
            elif loc.is_local or BACKENDS[loc.scheme][0] != "s3":
                with contextlib.suppress(FileNotFoundError):
                    out[loc] = loc.info()
            else:  # one HEAD (s3fs' info() lists the prefix too when the key is missing)
                bucket, _, key = loc.path.partition("/")
                with contextlib.suppress(FileNotFoundError):
                    out[loc] = _size_and_tag(loc.fs.call_s3("head_object", Bucket=bucket, Key=key))
    return out


# --- faults as one line ----------------------------------------------------------------------------
PROBE_TIMEOUT = 5  # seconds to connect in the up-front probe: an unreachable endpoint fails in seconds
_UNREACHABLE = {
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ConnectionClosedError",
    "ReadTimeoutError",
    "ClientConnectorError",
    "ServerDisconnectedError",
}
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "AZURE_STORAGE_KEY")


def _scrub(text: str) -> str:
    """A message with no credential in it: the environment's secrets and a URL's user:password@ removed."""
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return re.sub(r"//[^/@\s]+@", "//***@", text)


def failure(loc: Loc | str, e: BaseException) -> str | None:
    """The one line for a storage fault reading `loc` (bucket missing, key missing, access denied,
    endpoint unreachable, no credentials), naming the URL and the cause; None if `e` is not one."""
    name = type(e).__name__
    first = (str(e).splitlines() or [""])[0]
    if name in _UNREACHABLE or (isinstance(e, (ConnectionError, TimeoutError)) and not isinstance(e, PermissionError)):
        cause = f"the storage endpoint does not answer ({name}: {first})"
    elif name in ("NoCredentialsError", "PartialCredentialsError"):
        cause = "no credentials found (AWS_* environment variables, ~/.aws config, or a machine/pod role)"
    elif isinstance(e, PermissionError):
        cause = f"access denied ({first or 'Forbidden'}): check the credentials and the bucket's policy"
    elif isinstance(e, FileNotFoundError):
        bucket = "bucket" in first.lower() and "not exist" in first.lower()
        cause = "the bucket does not exist" if bucket else "not found"
    else:
        return None
    return _scrub(f"{loc}: {cause}")


def fault_line(error: BaseException) -> str | None:
    """The one line for a run that ended because the store stopped answering or took its credentials away
    (the server gone, the network down: after botocore's retries), also when Ray wrapped the error; None
    for anything else. It names the object the request was for (`s3://bucket/key`, read from the failed
    request's URL) and the cause. Entry points print it instead of a traceback (common/cli.user_errors)."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        cause = getattr(e, "cause", None)  # ray.exceptions.RayTaskError
        if isinstance(cause, BaseException):
            e = cause
            continue
        name = type(e).__name__
        if name in _UNREACHABLE or name in ("NoCredentialsError", "PartialCredentialsError"):
            return failure(_object_url(str(e)), e)
        e = e.__cause__ or e.__context__
    return None


def _object_url(message: str) -> str:
    """`s3://bucket/key` of the request URL a botocore error quotes (path-style or virtual-hosted), else
    "the object store"."""
    from urllib.parse import urlsplit

    m = re.search(r'"(https?://[^"\s]+)"', message)
    if m is None:
        return "the object store"
    url = urlsplit(m.group(1))
    host, path = url.hostname or "", url.path.strip("/")
    if ".s3." in host or ".s3-" in host:  # virtual-hosted: bucket.s3.region.amazonaws.com/key
        path = f"{host.split('.s3', 1)[0]}/{path}"
    return f"s3://{path}" if path else url.geturl()


def probe_all(texts: Iterable[str], options: Any = None) -> None:
    """`probe` each user path (a brace pattern's first name; a glob as it is): one line before any work."""
    for text in texts:
        probe(resolve(split_braces(text)[0], options))


def probe(loc: Loc) -> None:
    """Check a bucket URL up front, reading only: the endpoint answers, the bucket exists and, where the
    bucket itself may not be looked at, the object or prefix may. One attempt with a short connect
    timeout (an unreachable endpoint fails in seconds, not after minutes of retries). A missing key
    is not a fault here (the caller says what is missing). SigmaError with `failure`'s line. Local
    paths: nothing to do."""
    if loc.is_local:
        return
    quick = Loc(loc.scheme, loc.path, _hashable({**dict(loc.options), "connect_timeout": PROBE_TIMEOUT, "retries": 1}))
    bucket = loc.path.split("/", 1)[0]
    try:
        try:
            quick.fs.info(bucket)  # HEAD bucket: 404 if missing, 403 if not ours to look at
        except FileNotFoundError:
            raise SigmaError(f"{loc}: the bucket does not exist") from None
        except PermissionError:
            if bucket == loc.path:
                raise
            with contextlib.suppress(FileNotFoundError):  # a missing key is the caller's to report
                quick.fs.info(loc.path)  # some roles may read objects but not the bucket: try the object
    except SigmaError:
        raise
    except Exception as e:  # each client raises its own errors: failure() says which are storage faults
        message = failure(loc, e)
        if message is None:
            raise
        raise SigmaError(message) from None


# --- many pieces of few objects ------------------------------------------------------------------
COALESCE = 32 << 20  # bytes one ranged GET may span when many pieces of one object are read


class RangeReader:
    """Pieces (offset, size) of objects, read with few requests: the pieces wanted from one bucket object,
    sorted, are grouped into spans of at most `span` bytes (gaps included: bytes cost less than requests)
    and each span is fetched by one ranged GET when first needed; one span is held at a time (read the
    pieces in offset order). On disk each piece is read where it lies. Thread-safe."""

    def __init__(self, wanted: Iterable[tuple[Loc, int, int]], span: int = COALESCE) -> None:
        import threading

        pieces: dict[Loc, list[tuple[int, int]]] = {}
        for loc, offset, size in wanted:
            if not loc.is_local:
                pieces.setdefault(loc, []).append((offset, offset + size))
        self._spans: dict[Loc, list[tuple[int, int]]] = {}
        for loc, ranges in pieces.items():
            spans: list[tuple[int, int]] = []
            for start, end in sorted(ranges):
                if spans and end - spans[-1][0] <= span:
                    spans[-1] = (spans[-1][0], max(spans[-1][1], end))
                else:
                    spans.append((start, end))
            self._spans[loc] = spans
        self._held: tuple[Loc, int, bytes] | None = None
        self._lock = threading.Lock()

    def read(self, loc: Loc, offset: int, size: int) -> bytes:
        import bisect

        spans = self._spans.get(loc)
        if not spans:
            return loc.read_range(offset, size)
        with self._lock:
            held = self._held
            if held is None or held[0] != loc or not held[1] <= offset <= offset + size <= held[1] + len(held[2]):
                i = bisect.bisect_right(spans, offset, key=lambda span: span[0]) - 1
                if i < 0 or not spans[i][0] <= offset <= offset + size <= spans[i][1]:
                    return loc.read_range(offset, size)  # a piece not announced: read on its own
                start, end = spans[i]
                held = self._held = (loc, start, loc.read_range(start, end - start))
        return held[2][offset - held[1] : offset - held[1] + size]


def split_braces(text: str) -> list[str]:
    """`a/{00000..00002}.tar` -> the three names (braceexpand: ranges keep their zero padding)."""
    from braceexpand import braceexpand

    return list(braceexpand(text))


def has_pattern(text: str) -> bool:
    return "{" in text or bool(_GLOB.search(text))


def expand(text: str, options: Any = None) -> list[Loc]:
    """A user's path with brace ranges and globs, on disk or in a bucket, as the Locs it names, in the
    order written (a glob's matches sorted). A name with no glob is kept even if missing (the caller
    says it is missing); a glob that matches nothing contributes nothing."""
    out: list[Loc] = []
    for part in split_braces(text):
        loc = resolve(part, options)
        if not _GLOB.search(loc.path):
            out.append(loc)
            continue
        root = loc.path
        head = _GLOB.search(root)
        assert head is not None
        base = root[: head.start()].rsplit("/", 1)[0] or "/"
        pattern = root[len(base) :].lstrip("/")
        out += Loc(loc.scheme, base, loc.options).glob(pattern)
    return out


def matches(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern)


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def temp_file(name: str, folder: str | os.PathLike[str] | None = None, full: object = None) -> Iterator[Path]:
    """A temp file `.NAME.*.tmp` in `folder` (None: TMPDIR), removed at the end whatever happens; a full disk
    in the block is SigmaError naming `full` (default: the temp file). The one rule for local temp files."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield Path(tmp)
    except OSError as e:
        if e.errno in DISK_FULL:
            raise SigmaError(disk_full(full or tmp)) from None
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def local_temp(path: str | os.PathLike[str]) -> Iterator[Path]:
    """The disk's commit rule, defined once (shards/atomic.py and the writers below use it): yield a temp
    path beside `path`, fsynced and renamed onto it only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with temp_file(path.name, path.parent, full=path) as tmp:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; others on a shared filesystem must read it
        os.replace(tmp, path)


# --- commit markers ---------------------------------------------------------------------------------


def committed(folder: Loc) -> bool:
    """Whether a multi-file output folder is finished: its marker exists (an exact-name HEAD), or, on
    disk, the folder exists at all (it was renamed into place whole; folders made before markers)."""
    if (folder / MARKER).has_file():
        return True
    return folder.is_local and folder.is_dir()


@contextlib.contextmanager
def staging(folder: Loc) -> Iterator[Loc]:
    """Build a multi-file output: yields the Loc to write into. On disk a temp folder beside `folder`,
    renamed into place after the marker is written; on a bucket `folder` itself (a leftover from a
    killed writer removed first), committed by its marker written last. Nothing is committed if the
    block raises."""
    if folder.is_local:
        folder.parent.mkdir()
        tmp = Loc("", tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent.path))
        try:
            yield tmp
            with local_temp((tmp / MARKER).path):
                pass
            shutil.rmtree(folder.path, ignore_errors=True)
            os.replace(tmp.path, folder.path)
        finally:
            shutil.rmtree(tmp.path, ignore_errors=True)
        return
    folder.rmtree()
    yield folder
    folder.__truediv__(MARKER).write_object(b"")


@contextlib.contextmanager
def writer(dest: Loc) -> Iterator[IO[bytes]]:
    """A binary file object whose content appears at `dest` only if the block succeeds: on a bucket a
    streamed (multipart) upload completed at close and discarded on failure; on disk temp + rename."""
    if dest.is_local:
        with local_temp(dest.path) as tmp, open(tmp, "wb") as f:
            yield f
        return
    f = dest.fs.open(dest.path, "wb")
    try:
        yield f
    except BaseException:
        with contextlib.suppress(Exception):
            f.discard()  # aborts the multipart upload: nothing appears
        f.closed = True  # so that closing it later does not upload an empty object
        raise
    f.close()


# --- pyarrow readers ------------------------------------------------------------------------------


def arrow_fs(loc: Loc) -> Any:
    """The pyarrow filesystem for `loc.path` (None on disk: pyarrow opens and memory-maps local files itself)."""
    if loc.is_local:
        return None
    from pyarrow import fs

    return fs.PyFileSystem(fs.FSSpecHandler(loc.fs))


def read_parquet(loc: Loc, **kwargs: Any) -> Any:
    """`pyarrow.parquet.read_table` of one file on disk or in a bucket (columns=, filters=, schema= as there;
    a bucket file is one HEAD and ranged GETs: the footer, then the row groups wanted; through the opened
    object, as pyarrow's dataset layer would ask the store for the file's details several times)."""
    import pyarrow.parquet as pq

    if loc.is_local:
        return pq.read_table(loc.path, **kwargs)
    with loc.open("rb") as f:
        return pq.read_table(f, **kwargs)


def parquet_file(loc: Loc) -> Any:
    """`pyarrow.parquet.ParquetFile` of one file on disk or in a bucket (footer read; rows streamed on demand)."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(loc.path, filesystem=arrow_fs(loc))
