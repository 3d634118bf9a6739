import json

import pytest

from shards import fingerprint
from shards.errors import SigmaError


def test_first_run_records_and_a_same_resume_passes(tmp_path):
    fingerprint.check(tmp_path, {"urls": "abc", "threshold": 5.0})
    assert json.loads((tmp_path / fingerprint.FILE).read_text()) == {"threshold": 5.0, "urls": "abc"}
    fingerprint.check(tmp_path, {"threshold": 5.0, "urls": "abc"})  # key order does not matter


def test_a_changed_resume_names_what_changed(tmp_path):
    fingerprint.check(tmp_path, {"urls": "abc", "threshold": 5.0, "model": "m"})
    (tmp_path / "manifest.parquet").write_bytes(b"output")  # real output: protected
    with pytest.raises(SigmaError, match=r"made with another model, threshold \(see fingerprint.json\)"):
        fingerprint.check(tmp_path, {"urls": "abc", "threshold": 6.0, "model": "n"})
    with pytest.raises(SigmaError, match="another extra"):
        fingerprint.check(tmp_path, {"urls": "abc", "threshold": 5.0, "model": "m", "extra": 1})


def test_digests_see_content_and_listings_see_sizes(tmp_path):
    a = tmp_path / "a.parquet"
    a.write_bytes(b"x" * 10)
    d1 = fingerprint.file_digest(a)
    a.write_bytes(b"y" * 10)
    assert fingerprint.file_digest(a) != d1
    l1 = fingerprint.listing([a])
    a.write_bytes(b"y" * 11)
    assert fingerprint.listing([a]) != l1


def _photo(seed: int, size: int = 400) -> bytes:
    """A real-looking JPEG (noise: no two seeds share bytes past the header)."""
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _same_size(a: bytes, b: bytes) -> tuple[bytes, bytes]:
    n = min(len(a), len(b))
    return a[:n], b[:n]


def test_listing_sees_other_pixels_of_the_same_names_and_sizes(tmp_path):
    """Issue 28: a second folder, same file names and sizes, other pixels -> another listing; small files
    by their bytes, big ones (> 192 KiB) by mtime + sampled bytes, also when the copy kept the mtime."""
    import os

    small, big = _same_size(_photo(1, 100), _photo(2, 100)), _same_size(_photo(3, 900), _photo(4, 900))
    assert len(small[0]) < 3 * fingerprint._SAMPLE < len(big[0])
    for first, second in (small, big):
        one, two = tmp_path / "one", tmp_path / "two"
        for d, data in ((one, first), (two, second)):
            d.mkdir(exist_ok=True)
            (d / "x.jpg").write_bytes(data)
        os.utime(two / "x.jpg", ns=(0, (one / "x.jpg").stat().st_mtime_ns))  # as `cp -p` would
        assert fingerprint.listing([one / "x.jpg"]) != fingerprint.listing([two / "x.jpg"])
        assert fingerprint.listing([one / "x.jpg"]).startswith("v2:")
    a, b = tmp_path / "a" / "x.jpg", tmp_path / "b" / "x.jpg"
    for f in (a, b):  # a small file copied without its mtime: the same bytes, the same listing
        f.parent.mkdir()
        f.write_bytes(small[0])
    os.utime(b, ns=(0, 10**18))
    assert fingerprint.listing([a]) == fingerprint.listing([b])


def test_listing_of_a_big_file_edited_in_place_outside_the_samples(tmp_path):
    f = tmp_path / "00000.tar"
    data = bytearray(_photo(5, 1200) * 2)
    f.write_bytes(bytes(data))
    before = fingerprint.listing([f])
    data[len(data) // 4] ^= 0xFF  # not in the first, middle or last 64 KiB: seen by its mtime
    f.write_bytes(bytes(data))
    assert fingerprint.listing([f]) != before


def test_listing_never_opens_a_fifo(tmp_path):
    import os
    import signal

    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    signal.alarm(10)  # an open() for reading would block here forever
    try:
        assert fingerprint.listing([fifo]).startswith("v2:")
    finally:
        signal.alarm(0)


def test_a_fingerprint_json_of_the_v1_rule_resumes_for_the_same_files_only(tmp_path):
    """Folders made before the v2 listing: their fingerprint.json (name + size digests) is accepted while
    the files are unchanged, and refused once one changes (even at the same size)."""
    import hashlib
    from pathlib import Path

    def v1(paths):  # the rule as it was written before v2
        h = hashlib.sha256()
        for p in sorted(map(Path, paths)):
            h.update(f"{p.name}\t{p.stat().st_size if p.exists() else -1}\n".encode())
        return h.hexdigest()

    inputs = tmp_path / "in"
    inputs.mkdir()
    files = [inputs / f"{i}.jpg" for i in range(3)]
    for i, f in enumerate(files):
        f.write_bytes(_photo(i, 100))
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.parquet").write_bytes(b"output")  # a folder with output: a change is refused
    old = {"--images": f"folder {v1(files)}", "listed": [f"a {v1(files[:1])}"], "threshold": 5.0}
    (out / fingerprint.FILE).write_text(json.dumps(old))

    def now(threshold=5.0):
        return {
            "--images": f"folder {fingerprint.listing(files)}",
            "listed": [f"a {fingerprint.listing(files[:1])}"],
            "threshold": threshold,
        }

    with pytest.raises(SigmaError, match=r"made with another threshold \(see"):  # only what really changed
        fingerprint.check(out, now(6.0))
    assert json.loads((out / fingerprint.FILE).read_text()) == old
    fingerprint.check(out, now())  # accepted, and recorded by the v2 rule from now on
    assert json.loads((out / fingerprint.FILE).read_text()) == now()
    fingerprint.check(out, now())
    files[1].write_bytes(_same_size(_photo(9, 100), files[1].read_bytes())[0])  # other pixels, same size
    assert v1(files) in old["--images"]  # the v1 rule cannot see it ...
    with pytest.raises(SigmaError, match=r"another --images \(see"):  # ... v2 does, and refuses
        fingerprint.check(out, now())


def test_listing_of_bucket_objects_sees_a_rewrite_at_the_same_size(bucket):
    from shards import atomic, storage

    obj = storage.resolve(bucket + "/shards/00000.tar")
    atomic.write_bytes(obj, b"a" * 100)
    before = fingerprint.listing([obj])
    atomic.write_bytes(obj, b"b" * 100)
    assert fingerprint.listing([obj]) != before


# ---------------------------------------------------------------------------------------------
# "Changes the output" is a property of the config field (metadata), read here for every stage
# ---------------------------------------------------------------------------------------------


def test_flat_leaves_out_fields_marked_same_output():
    from dataclasses import dataclass, field

    @dataclass
    class Inner:
        size: int = 3
        workers: int = field(default=8, metadata={fingerprint.OUTPUT: False})

    @dataclass
    class Section:
        threshold: float = 5.0
        inner: Inner = field(default_factory=Inner)
        pool: Inner = field(default_factory=Inner, metadata={fingerprint.OUTPUT: False})
        named: dict = field(default_factory=lambda: {"a": {"x": 1}})
        empty: dict = field(default_factory=dict)

    assert fingerprint.flat(Section(), "s") == {"s.threshold": 5.0, "s.inner.size": 3, "s.named.a.x": 1, "s.empty": {}}


@pytest.mark.parametrize(
    "section, same, changes",
    [
        (
            "curation",
            [
                "download.processes",
                "download.threads",
                "download.num_cpus",
                "download.per_domain_limit",
                "download.contact",
                "aesthetic_resources.batch_size",
            ],
            ["download.max_bytes", "aesthetic.threshold", "dedup.phash_radius", "shard_size", "download.robots_txt"],
        ),
        (
            "encode",
            ["vae_slicing", "shard_bytes", "t5_resources.concurrency", "vae_resources.batch_size"],
            ["t5_dtype", "t5_max_length", "vae_dtype", "vae_tiling"],
        ),
        ("training.stages.1k", ["steps", "data", "parent"], ["lr", "batch_size", "kv_compress_layers", "seed"]),
    ],
)
def test_each_stage_fingerprints_what_changes_its_output_and_nothing_else(section, same, changes):
    import dataclasses

    from common import config

    def value_at(obj, dotted):
        for k in dotted.split("."):
            obj = obj[k] if isinstance(obj, dict) else getattr(obj, k)
        return obj

    def changed(key):
        old = value_at(config.load(profile="demo"), f"{section}.{key}")
        new = {
            bool: lambda v: not v,
            int: lambda v: v + 1,
            float: lambda v: v * 2,
            list: lambda v: v + [0],
            type(None): lambda v: "x",
            str: lambda v: v + "x",
        }[type(old)](old)
        if key in ("download.contact",):
            new = "mailto:someone@example.org"
        if isinstance(new, str) and key.endswith("dtype"):
            new = "float16" if old != "float16" else "bfloat16"
        return config.load(
            profile="demo", overrides=[f"{section}.{key}={new!r}" if isinstance(new, str) else f"{section}.{key}={new}"]
        )

    base = fingerprint.flat(value_at(config.load(profile="demo"), section), section)
    for key in same:
        assert fingerprint.flat(value_at(changed(key), section), section) == base, key
    for key in changes:
        after = fingerprint.flat(value_at(changed(key), section), section)
        assert after != base and f"{section}.{key}" in {k for k in after if after[k] != base.get(k)}, key
    assert dataclasses.is_dataclass(value_at(config.load(profile="demo"), section))


def test_captioner_settings_that_only_place_or_permit_the_model_are_not_output():
    from common import config

    cap = config.load(profile="demo").captioning.captioners["hf"]
    same = {"trust_remote_code", "runtime_env", "resources"}
    flat = fingerprint.flat(cap, "c")
    assert not {k for k in flat if k.split(".")[1] in same}
    assert {"c.prompt", "c.max_new_tokens", "c.dtype", "c.model", "c.revision"} <= set(flat)


def test_a_folder_with_no_output_yet_restarts_with_other_settings(tmp_path, capsys):
    """A refused or failed run left only fingerprint.json and work state: a run with other settings
    restarts it (one line), the stale work state removed; real outputs stay protected."""
    out = tmp_path / "out"
    fingerprint.check(out, {"t5_tokenizer": "google/t5-v1_1-xxl", "shard_size": 10_000})
    (out / "_work" / "input").mkdir(parents=True)
    (out / "_work" / "input" / "00000.parquet").write_bytes(b"cut at 10000")
    (out / ".x.parquet.abc.tmp").write_bytes(b"")  # a killed writer's temp file is not output either
    (out / "shards").mkdir()  # nor an empty folder made at the start
    capsys.readouterr()
    fingerprint.check(out, {"t5_tokenizer": "tiny", "shard_size": 16})
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{out}: no output yet (only fingerprint.json, _work): restarting" in err, err
    assert "shard_size, t5_tokenizer" in err and not (out / "_work").exists()
    assert json.loads((out / fingerprint.FILE).read_text()) == {"shard_size": 16, "t5_tokenizer": "tiny"}
    fingerprint.check(out, {"t5_tokenizer": "other", "shard_size": 16}, dry_run=True)  # a dry run only says so
    assert (
        "would restart" in capsys.readouterr().err
        and json.loads((out / fingerprint.FILE).read_text())["t5_tokenizer"] == "tiny"
    )
    (out / "00000.parquet").write_bytes(b"a caption file")
    with pytest.raises(SigmaError, match="made with another t5_tokenizer"):
        fingerprint.check(out, {"t5_tokenizer": "other", "shard_size": 16})


def test_two_runs_into_one_folder_at_once_are_refused(tmp_path):
    """The first run holds FOLDER/.lock (flock) until its process ends, killed or not."""
    import subprocess
    import sys

    out = tmp_path / "out"
    out.mkdir()
    hold = (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(out / fingerprint.LOCK)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(120)\n"
    )
    other = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "held"
        with pytest.raises(SigmaError) as e:
            fingerprint.check(out, {"urls": "abc"})
        assert str(e.value) == (
            f"{out}: another run is writing into it now (it holds .lock); wait for it to end, or use another --out"
        )
        assert not (out / fingerprint.FILE).exists()
    finally:
        other.kill()
        other.wait()
    fingerprint.check(out, {"urls": "abc"})  # its process gone, the lock is free
    fingerprint.check(out, {"urls": "abc"})  # held by this process now: its own later checks pass


def test_a_bucket_folder_with_no_output_restarts_through_loc_methods(bucket, capsys):
    from shards import storage

    out = storage.resolve(bucket + "/out")
    fingerprint.check(out, {"captions": "a"})
    from shards.atomic import write_bytes

    write_bytes(out / "_work" / "input" / "00000.parquet", b"stale")
    fingerprint.check(out, {"captions": "b"})
    assert "restarting with the new captions" in capsys.readouterr().err
    assert not (out / "_work" / "input" / "00000.parquet").exists()
    write_bytes(out / "index.parquet", b"output")
    with pytest.raises(SigmaError, match="made with another captions"):
        fingerprint.check(out, {"captions": "c"})


def test_a_stage_run_holds_the_lock_for_its_own_duration_only(tmp_path):
    import fcntl
    import os

    out = tmp_path / "out"

    def free() -> bool:
        fd = os.open(out / fingerprint.LOCK, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

    @fingerprint.releases_locks
    def run():
        fingerprint.check(out, {"urls": "abc"})
        assert not free()  # held while it runs

    run()
    assert free()  # released when it returned: a later run (another process, or this one) may start


def test_a_bucket_folder_is_leased_while_a_run_writes_into_it(bucket):
    """FOLDER/.lock in a bucket: a lease taken by a conditional PUT; another run is refused while it is fresh;
    a lease past its end, or left by a killed process of this machine, is taken over; released at the end."""
    import socket
    import subprocess
    import time

    from shards import atomic, storage

    out = storage.resolve(bucket + "/out")
    lease = out / fingerprint.LOCK

    @fingerprint.releases_locks
    def run():
        fingerprint.check(out, {"urls": "abc"}, lease=True)
        owner = json.loads(lease.read_text())
        assert lease.has_file() and owner["expires"] > time.time()
        with pytest.raises(SigmaError, match="another run is writing into it now"):
            fingerprint.Lease(lease)  # a second run (another process, here or elsewhere) at the same time

    run()
    assert not lease.has_file()  # released: a later run may start
    fingerprint.check(out / "train", {"urls": "abc"})  # without `lease` (training keeps its own): none taken
    assert not (out / "train" / fingerprint.LOCK).has_file()

    gone = subprocess.Popen(["sleep", "0"])  # a process of this machine that has ended
    gone.wait()
    here = {"host": socket.gethostname(), "pid": gone.pid, "expires": time.time() + 100}
    for left in (here, {"host": "elsewhere", "pid": 1, "expires": 0}):
        atomic.write_text(lease, json.dumps(left))  # killed here / expired elsewhere: taken over
        fingerprint.Lease(lease).release()
        assert not lease.has_file()
    atomic.write_text(lease, json.dumps({"host": "elsewhere", "pid": 1, "expires": time.time() + 100}))
    with pytest.raises(SigmaError, match=r"another run is writing into it now \(elsewhere, pid 1"):
        fingerprint.Lease(lease)
