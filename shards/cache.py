"""The node-local cache of bucket objects: the training shards the loader reads from a bucket (bounded,
least recently used removed first) and model folders given as bucket URLs (copied once, kept).

    cache = ShardCache("/local/cache/shards", max_bytes=100 << 30)
    with cache.open(tar_loc, etag, size) as f:   # a local file holding the object's bytes
        ...
    folder = copy_once(storage.resolve("s3://bucket/models/t5"), Path("/local/cache/models"))

Keys. An entry's name is a hash of the object's URL, ETag and size, then its own name: a rewritten
object (a new ETag) is a new entry, so changed bytes are never read as the old ones.

Commit. An entry is downloaded into a temp file in the cache folder and renamed into place whole
(shards/storage.local_temp, the disk's commit rule): a killed process leaves a temp file, never a
half entry under an entry's name; temp files nobody has written for STALE seconds are removed by
the next eviction. Losing the folder (a node's disk gone) only means an empty cache: entries are
fetched again.

Sharing. One folder serves every rank and loader worker of a node, with file locks (fcntl.flock):
- a download holds its entry's lock (`.locks/<entry>`): another process wanting the same object
  waits and then reads that copy (one GET per object per node, not per worker);
- eviction holds the folder's lock (`.locks/folder`), one process at a time;
- a reader holds an open file descriptor, not a name (a fetch opens its temp file before the rename):
  an entry removed while it is read keeps its bytes until closed (POSIX unlink).
The folder holds at most `max_bytes` of entries plus the ones being downloaded or just fetched
(an entry larger than `max_bytes` is kept alone while it is read).

LRU. A hit sets the entry's mtime to now; eviction removes the oldest mtimes first.

Streaming (`open(..., stream=True)`, the loader's resampled draws): on a miss a background thread
downloads the object in ranged GETs of CHUNK bytes (a parquet file's last TAIL bytes first, where its
reader starts) into the temp file, and the caller reads it as it arrives (`_Following`): the first
bytes after one request, not after the whole object. The entry is renamed into place when complete,
as above; when another process is already downloading it, the caller waits for that copy instead.

Model folders (`copy_once`) are copied whole into a temp folder beside their place with a manifest of
the listing (relative name, size, ETag) and renamed into place: a folder is used only when its
manifest matches the bucket's listing now (one LIST request per load), so a half copy is never used
and a changed model is copied again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from shards import storage
from shards.errors import SigmaError

ROOT = Path(os.environ.get("SIGMAFORGE_CACHE") or Path.home() / ".cache" / "sigmaforge")  # local caches' home
SHARDS, MODELS = ROOT / "shards", ROOT / "models"  # the default folders (storage.cache.folder, .models)
LOCKS = ".locks"
STALE = 600  # seconds without a write after which a temp file is a killed download's leftover
CHUNK = 32 << 20  # bytes per ranged GET of a streamed download: 32 GETs per GB
TAIL = 1 << 20  # a streamed parquet file's last bytes, fetched first: its reader starts at the footer
MANIFEST = "_COPIED.json"  # a model folder's listing, written into the temp folder before the rename
THREAD = "sigmaforge-cache-download"  # the name of a streamed download's thread


def version(info: dict[str, Any]) -> tuple[str | None, int]:
    """(ETag, size) of an object from its fsspec listing or HEAD entry: what changes when it is rewritten."""
    tag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("generation")
    return (str(tag).strip('"') if tag is not None else None), int(info.get("size") or 0)


def entry_name(loc: storage.Loc, etag: str | None, size: int) -> str:
    """The cache's name for one version of an object: hash(URL, ETag, size) + its own name."""
    h = hashlib.sha256(f"{loc.url}\n{etag}\n{size}".encode()).hexdigest()[:24]
    return f"{h}-{loc.name}"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive flock on `path` (created if missing), held for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class ShardCache:
    """Bucket objects as local files in `folder`, at most `max_bytes` of them (see the module docstring).
    Counts what it did in this process: `hits`, `misses`, `fetched_bytes`, `evictions`."""

    def __init__(self, folder: str | os.PathLike[str], max_bytes: int):
        self.folder, self.max_bytes = Path(folder), int(max_bytes)
        self.hits = self.misses = self.fetched_bytes = self.evictions = 0

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder, "max_bytes": self.max_bytes}  # counters are per process

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["folder"], state["max_bytes"])  # type: ignore[misc]

    def open(self, loc: storage.Loc, etag: str | None, size: int, stream: bool = False) -> IO[bytes]:
        """The object's bytes as a local file opened for reading, fetched first on a miss; `stream`: on a
        miss, read while a background thread downloads (`_Following`) instead of after the download."""
        path = self.folder / entry_name(loc, etag, size)
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            following = self._stream(loc, path, size) if stream else None
            return following if following is not None else self._fetch(loc, path, size)
        self.hits += 1
        with contextlib.suppress(FileNotFoundError):
            os.utime(path)  # most recently used
        return f

    def fetch(self, loc: storage.Loc, etag: str | None, size: int) -> None:
        """Put the object in the cache (read-ahead); nothing to do when it is there."""
        self.open(loc, etag, size).close()

    def _fetch(self, loc: storage.Loc, path: Path, size: int) -> IO[bytes]:
        with _locked(self.folder / LOCKS / path.name):  # one download of an object per node
            with contextlib.suppress(FileNotFoundError):
                f = open(path, "rb")  # another process fetched it while this one waited
                self.hits += 1
                return f
            self.misses += 1
            opened: list[IO[bytes]] = []
            try:
                with storage.local_temp(path) as tmp:
                    _download(loc, tmp)
                    got = tmp.stat().st_size
                    if got != size:  # the object changed since it was listed: its key would be wrong
                        raise SigmaError(f"{loc}: changed while it was read ({got} bytes, listed {size}); restart")
                    opened.append(open(tmp, "rb"))  # reads the entry whatever eviction does after the rename
            except BaseException:
                for g in opened:
                    g.close()
                raise
            self.fetched_bytes += got
        with _locked(self.folder / LOCKS / "folder"):
            self._evict(keep=path.name)
        return opened[0]

    def _stream(self, loc: storage.Loc, path: Path, size: int) -> IO[bytes] | None:
        """Start downloading a missing entry in a background thread and return a reader that follows the
        download; None when another process or thread is downloading it (the caller then waits for it)."""
        lock = self.folder / LOCKS / path.name
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        if path.exists():  # fetched meanwhile
            os.close(fd)
            return None
        self.misses += 1
        following = _Following(size)
        threading.Thread(
            target=self._download, args=(loc, path, size, fd, following), name=f"{THREAD}-{path.name}", daemon=True
        ).start()
        return io.BufferedReader(following.opened(), buffer_size=1 << 20)

    def _download(self, loc: storage.Loc, path: Path, size: int, lock_fd: int, following: _Following) -> None:
        """The background download of `_stream` (its entry's lock held until the entry is in place): in
        ranged GETs of CHUNK bytes, in order; a parquet file's last TAIL bytes first (its reader starts
        at the footer)."""
        try:
            with storage.local_temp(path) as tmp, open(tmp, "r+b") as out:
                out.truncate(size)
                following.attach(tmp)
                tail = min(TAIL, size) if path.suffix == ".parquet" else 0
                spans = [(size - tail, size)] if tail else []
                spans += [(a, min(a + CHUNK, size - tail)) for a in range(0, size - tail, CHUNK)]
                for a, b in spans:
                    data = _read_range(loc, a, b - a)
                    if len(data) != b - a:
                        raise SigmaError(f"{loc}: changed while it was read (listed {size} bytes); restart")
                    out.seek(a)
                    out.write(data)
                    out.flush()
                    following.ready(a, b)
            self.fetched_bytes += size
            following.finish(None)
        except BaseException as e:  # noqa: BLE001 - a background thread hands every failure to its reader
            following.finish(e)
        finally:
            os.close(lock_fd)
        with contextlib.suppress(OSError), _locked(self.folder / LOCKS / "folder"):
            self._evict(keep=path.name)

    def _evict(self, keep: str) -> None:
        """Remove least recently used entries until the folder holds at most max_bytes (the folder lock is held)."""
        entries, total, now = [], 0, time.time()
        with os.scandir(self.folder) as it:
            for e in it:
                try:
                    if not e.is_file(follow_symlinks=False):
                        continue
                    st = e.stat(follow_symlinks=False)
                except FileNotFoundError:  # a temp file renamed meanwhile (another fetch), an entry evicted
                    continue
                if e.name.startswith("."):
                    if e.name.endswith(".tmp") and now - st.st_mtime > STALE:
                        Path(e.path).unlink(missing_ok=True)  # a killed download's leftover
                    continue
                total += st.st_size
                if e.name != keep:
                    entries.append((st.st_mtime, e.name, st.st_size))
        for _, name, n in sorted(entries):
            if total <= self.max_bytes:
                break
            (self.folder / name).unlink(missing_ok=True)
            (self.folder / LOCKS / name).unlink(missing_ok=True)
            total -= n
            self.evictions += 1

    def stats(self) -> dict[str, int]:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "fetched_bytes": self.fetched_bytes,
            "evictions": self.evictions,
        }


def _download(loc: storage.Loc, dest: Path) -> None:
    """One object into a local file; a storage fault is one line naming the URL."""
    try:
        loc.download(dest)
    except Exception as e:  # each client raises its own errors: storage.failure says which are faults
        message = storage.failure(loc, e)
        if message is None:
            raise
        raise SigmaError(message) from None


def _read_range(loc: storage.Loc, offset: int, size: int) -> bytes:
    try:
        return loc.read_range(offset, size)
    except Exception as e:
        message = storage.failure(loc, e)
        if message is None:
            raise
        raise SigmaError(message) from None


class _Following(io.RawIOBase):
    """A file being downloaded into the cache, read as it arrives: a read waits until bytes at its position
    are written (`ready` spans: a prefix from 0 and, for a parquet file, its tail) and returns those,
    read from the temp file (the same inode once renamed into place). A failed download fails the read."""

    def __init__(self, size: int):
        super().__init__()
        self.size, self._pos, self._prefix, self._tail = size, 0, 0, size
        self._f: io.FileIO | None = None
        self._done, self._error = False, None  # type: tuple[bool, BaseException | None]
        self._cond = threading.Condition()

    def attach(self, tmp: Path) -> None:
        with self._cond:
            self._f = open(tmp, "rb", buffering=0)  # unbuffered: a buffer would keep bytes not yet written
            self._cond.notify_all()

    def ready(self, a: int, b: int) -> None:
        with self._cond:
            if a == self._prefix:
                self._prefix = b
            else:
                self._tail = a
            self._cond.notify_all()

    def finish(self, error: BaseException | None) -> None:
        with self._cond:
            self._done, self._error = True, error
            self._cond.notify_all()

    def opened(self) -> _Following:
        """Self, once the temp file exists (or the download failed before)."""
        with self._cond:
            self._cond.wait_for(lambda: self._f is not None or self._done)
        self._check()
        return self

    def _check(self) -> None:
        if self._error is not None:
            if isinstance(self._error, SigmaError):
                raise SigmaError(str(self._error))
            raise SigmaError(f"download into the cache failed: {self._error!r}")

    def _end(self, pos: int) -> int:
        """How far the bytes from `pos` on are written (`pos` itself: none yet)."""
        if (self._done and self._error is None) or pos >= self._tail:
            return self.size
        return max(pos, self._prefix)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = {0: offset, 1: self._pos + offset, 2: self.size + offset}[whence]
        return self._pos

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self.size - self._pos)
        if n <= 0:
            return 0
        with self._cond:  # what is there already: a partial read, as a raw file may return
            self._cond.wait_for(lambda: self._end(self._pos) > self._pos or self._error is not None)
            n = min(n, self._end(self._pos) - self._pos)
        if n <= 0:
            self._check()
        assert self._f is not None
        self._f.seek(self._pos)
        got = self._f.readinto(memoryview(buffer)[:n])
        self._pos += got
        return got

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
        super().close()


# ---------------------------------------------------------------------------------------------
# Model folders (and single weight files) given as bucket URLs
# ---------------------------------------------------------------------------------------------


def _listing(loc: storage.Loc) -> tuple[bool, list[list[Any]]]:
    """(is a single file, [[relative name, size, etag], ...] sorted) of an object or a folder: one LIST
    (a HEAD first for a single object). A missing object or empty prefix is one line naming the URL."""
    try:
        found = loc.fs.find(loc.path, detail=True)
        single = False
        if not found:
            info = loc.fs.info(loc.path)
            if info.get("type") != "file":
                raise FileNotFoundError(loc.url)
            found, single = {loc.path: info}, True
    except SigmaError:
        raise
    except Exception as e:
        message = storage.failure(loc, e)
        if message is None:
            raise
        raise SigmaError(message) from None
    rows = []
    base = loc.path.rstrip("/") + "/"
    for key, info in sorted(found.items()):
        etag, size = version(info)
        rows.append([loc.name if single else key[len(base) :], size, etag])
    return single, rows


def copy_once(loc: storage.Loc, root: Path) -> Path:
    """A local copy of a bucket folder (a model's files) or of one object (a weights file), made once per
    version in `root` (see the module docstring): the folder, or the file inside its folder."""
    single, rows = _listing(loc)
    dest = root / f"{hashlib.sha256(loc.url.encode()).hexdigest()[:16]}-{loc.name}"
    manifest = {"url": loc.url, "files": rows}

    def current() -> bool:
        try:
            return bool(json.loads((dest / MANIFEST).read_text()) == manifest)
        except (OSError, ValueError):
            return False

    if not current():
        with _locked(root / LOCKS / dest.name):
            if not current():
                tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=root))
                try:
                    for rel, _, _ in rows:
                        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                        _download(loc if single else loc / rel, tmp / rel)
                    (tmp / MANIFEST).write_text(json.dumps(manifest))
                    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=root))
                    with contextlib.suppress(FileNotFoundError):
                        os.replace(dest, old / "x")  # a previous version: out of the way, then removed
                    os.replace(tmp, dest)
                    shutil.rmtree(old, ignore_errors=True)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
    return dest / loc.name if single else dest
