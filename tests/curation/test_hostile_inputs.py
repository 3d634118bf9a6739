"""Issue 28: images on disk as a hostile disk holds them, on real photos (tools/real-images). Every item
is a manifest row (links in a tar followed when they stay inside it, a key given twice kept twice, FIFOs,
sockets and devices never opened, unreadable files and folders, captions that are not UTF-8), and the
run goes on. The split is checked without Ray; then the real entry point on a local Ray, and once as a
process without CAP_DAC_OVERRIDE (root reads mode-000 files), so its Ray workers cannot read them either.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation import sources
from shards.curated import read_member

ROOT = Path(__file__).resolve().parents[2]
PHOTOS = ["mate_nature_Aqua.jpg", "mate_nature_FreshFlower.jpg", "mate_nature_GreenMeadow.jpg"]
LATIN1 = "Café crème, déjà vu à Zürich"  # as a latin-1 .txt: every accented letter one byte
CP1252 = "“Smart quotes” – and a euro: €"  # bytes 0x93 0x94 0x96 0x80: cp1252, not latin-1
RUN = {"capture_output": True, "text": True, "timeout": 120}
SETTINGS = ["--profile", "demo", "--set", "curation.download.shard_size=4", "--set", "curation.shard_size=3"]


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> Path:
    real = ROOT / ".cache" / "real"
    if not (real / "images").is_dir() or not any((real / "images").iterdir()):
        subprocess.run([str(ROOT / "tools" / "real-images"), str(real)], check=True)
    return real / "images"


@contextmanager
def no_hang(seconds: int = 60):
    """A test that would block on a FIFO fails instead of hanging (the code must never open one)."""

    def fail(*_):
        raise TimeoutError(f"blocked for {seconds} s: a FIFO was opened")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def split(src: sources.LocalImages, out: Path, shard_size: int = 100) -> tuple[pd.DataFrame, list[dict]]:
    """(the input shards' rows, the where rows): what the run reads, without Ray."""
    work = out / "_work"
    n = src.split(work / "input", shard_size)
    items = pd.concat([pd.read_parquet(work / "input" / f"{i:05d}.parquet") for i in range(n)], ignore_index=True)
    wheres = [r for i in range(n) for r in src.shard_rows(work, out / "downloads", i, None)]
    return items, wheres


def by_source(items: pd.DataFrame, wheres: list[dict]) -> dict[str, dict]:
    rows = {w["key"]: w for w in wheres}
    return {s: {**rows[k], "caption": c} for k, s, c in zip(items["key"], items["source"], items["caption"])}


def member(tar: tarfile.TarFile, name: str, data: bytes | None = None, **kind) -> None:
    info = tarfile.TarInfo(name)
    for k, v in kind.items():
        setattr(info, k, v)
    if data is not None:
        info.size = len(data)
    tar.addfile(info, io.BytesIO(data) if data is not None else None)


@pytest.fixture(scope="module")
def hostile_tar(real, tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """A WebDataset tar with every kind of member: links inside and outside, a key twice, a FIFO."""
    d = tmp_path_factory.mktemp("tars") / "shards"
    d.mkdir()
    photo = {n: (real / n).read_bytes() for n in PHOTOS}
    a, b, c = (photo[n] for n in PHOTOS)
    with tarfile.open(d / "00000.tar", "w") as tar:
        member(tar, "0000.jpg", a)
        member(tar, "0000.txt", b"the original")
        member(tar, "0001.jpg", type=tarfile.SYMTYPE, linkname="0000.jpg")  # inside: followed
        member(tar, "0001.txt", b"a symlink to 0000")
        member(tar, "0002.jpg", type=tarfile.LNKTYPE, linkname="0000.jpg")  # a hardlink: followed
        member(tar, "sub/0003.jpg", type=tarfile.SYMTYPE, linkname="../0004.jpg")  # a later member, up a folder
        member(tar, "0004.jpg", b)
        member(tar, "0005.jpg", type=tarfile.SYMTYPE, linkname="../outside.jpg")  # leaves the tar
        member(tar, "0006.jpg", type=tarfile.SYMTYPE, linkname="/etc/hostname")  # absolute: leaves the tar
        member(tar, "0007.jpg", type=tarfile.SYMTYPE, linkname="missing.jpg")
        member(tar, "0008.jpg", type=tarfile.SYMTYPE, linkname="0009.jpg")  # a loop
        member(tar, "0009.jpg", type=tarfile.SYMTYPE, linkname="0008.jpg")
        member(tar, "0010.jpg", a)  # a key given twice: both kept
        member(tar, "0010.txt", b"first of 0010")
        member(tar, "0010.jpg", c)
        member(tar, "0010.txt", b"second of 0010")
        member(tar, "0011.jpg", type=tarfile.FIFOTYPE)  # a FIFO member
        member(tar, "0012.jpg", c)
        member(tar, "0012.txt", LATIN1.encode("latin-1"))
        member(tar, "0013.jpg", type=tarfile.SYMTYPE, linkname="0012.jpg")
        member(tar, "0013.txt", type=tarfile.SYMTYPE, linkname="0000.txt")  # its caption a link too
    return d, photo


def test_tar_links_inside_the_tar_are_followed_and_others_are_rows(hostile_tar, tmp_path):
    d, photo = hostile_tar
    items, wheres = split(sources.local_images(d), tmp_path)
    row = by_source(items, wheres)
    tar = d / "00000.tar"

    def got(name):
        r = row[f"{tar}::{name}"]
        return read_member(r["src"], r["offset"], r["size"]) if not r["reason"] else r["reason"]

    a, b, c = (photo[n] for n in PHOTOS)
    assert len(row) == len(items) == 15  # 15 images (0010 twice), each a row: all accounted
    assert got("0001.jpg") == got("0002.jpg") == got("0000.jpg") == a  # symlink, hardlink: the target's bytes
    assert got("sub/0003.jpg") == b and row[f"{tar}::0001.jpg"]["caption"] == "a symlink to 0000"
    assert got("0013.jpg") == c and row[f"{tar}::0013.jpg"]["caption"] == "the original"
    for name in ("0005.jpg", "0006.jpg", "0007.jpg", "0008.jpg", "0009.jpg"):
        assert got(name) == "unresolved_link", name  # outside the tar, absent, a loop: a row, never read
    assert got("0011.jpg") == "special_file"


def test_tar_key_given_twice_keeps_both(hostile_tar, tmp_path):
    d, photo = hostile_tar
    items, wheres = split(sources.local_images(d), tmp_path)
    row = by_source(items, wheres)
    first, second = row[f"{d / '00000.tar'}::0010.jpg"], row[f"{d / '00000.tar'}::0010.jpg#2"]
    assert read_member(first["src"], first["offset"], first["size"]) == photo[PHOTOS[0]]
    assert read_member(second["src"], second["offset"], second["size"]) == photo[PHOTOS[2]]
    assert (first["caption"], second["caption"]) == ("first of 0010", "second of 0010")


def test_tar_caption_in_latin1_is_decoded_and_counted(hostile_tar, tmp_path):
    d, _ = hostile_tar
    items, wheres = split(sources.local_images(d), tmp_path)
    assert by_source(items, wheres)[f"{d / '00000.tar'}::0012.jpg"]["caption"] == LATIN1
    assert not items["caption"].dropna().str.contains("\ufffd").any()
    counted = json.loads((tmp_path / "_work" / "input" / sources.CAPTIONS).read_text())
    assert counted == {"captions_not_utf8": {"cp1252": 1}}


@pytest.fixture
def hostile_folder(real, tmp_path) -> tuple[Path, Path]:
    """A folder of real photos beside FIFOs, a socket, a device, broken links, a link loop, links that
    leave the folder (a file, a folder: followed, as a Hugging Face cache needs), captions in cp1252."""
    outside = tmp_path / "elsewhere"
    (outside / "blobs").mkdir(parents=True)
    shutil.copy(real / PHOTOS[2], outside / "blobs" / "3f2a")
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    for i, name in enumerate(PHOTOS[:2]):
        shutil.copy(real / name, d / f"p{i}.jpg")
    (d / "p0.txt").write_bytes(LATIN1.encode("latin-1"))
    (d / "p1.txt").write_bytes(CP1252.encode("cp1252"))
    os.mkfifo(d / "fifo.jpg")
    shutil.copy(real / PHOTOS[0], d / "fifo-caption.jpg")
    os.mkfifo(d / "fifo-caption.txt")  # its caption a FIFO: never opened either
    os.symlink("/dev/zero", d / "device.jpg")  # a device behind a link: a read would never end
    (d / "dangling.jpg").symlink_to(d / "gone.jpg")
    (d / "loop.jpg").symlink_to(d / "loop.jpg")
    (d / "sub" / "hf.jpg").symlink_to(outside / "blobs" / "3f2a")  # a link leaving the folder: followed
    (d / "linked").symlink_to(outside / "blobs", target_is_directory=True)  # no image names inside
    (d / "sub" / "back").symlink_to(d, target_is_directory=True)  # a folder loop: walked once
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(d / "socket.png"))
    yield d, outside
    sock.close()


def test_folder_special_files_are_rows_never_opened(hostile_folder, tmp_path):
    d, _ = hostile_folder
    with no_hang():
        src = sources.local_images(d, tmp_path / "out")
        fp = src.fingerprint()  # lists them too, by their stat
        items, wheres = split(src, tmp_path / "out", shard_size=3)
    row = by_source(items, wheres)
    assert {Path(s).name: r["reason"] for s, r in row.items()} == {
        "p0.jpg": "",
        "p1.jpg": "",
        "fifo.jpg": "special_file",
        "fifo-caption.jpg": "special_file",
        "device.jpg": "special_file",
        "socket.png": "special_file",
        "dangling.jpg": "unresolved_link",
        "loop.jpg": "unresolved_link",
        "hf.jpg": "",
    }
    assert fp["--images"].startswith("folder v2:")


def test_folder_links_leaving_it_are_followed(hostile_folder, real, tmp_path):
    d, _ = hostile_folder
    items, wheres = split(sources.local_images(d), tmp_path / "out")
    r = by_source(items, wheres)[str(d / "sub" / "hf.jpg")]
    assert read_member(r["src"], r["offset"], r["size"]) == (real / PHOTOS[2]).read_bytes()


def test_folder_captions_not_utf8_are_decoded_and_counted(hostile_folder, tmp_path):
    d, _ = hostile_folder
    items, wheres = split(sources.local_images(d), tmp_path / "out")
    row = by_source(items, wheres)
    assert row[str(d / "p0.jpg")]["caption"] == LATIN1 and row[str(d / "p1.jpg")]["caption"] == CP1252
    counted = json.loads((tmp_path / "out" / "_work" / "input" / sources.CAPTIONS).read_text())
    assert counted == {"captions_not_utf8": {"cp1252": 2}}


def test_caption_decoding_rule():
    assert sources.decode_caption("ünïcödé".encode()) == ("ünïcödé", None)
    assert sources.decode_caption(b"\xef\xbb\xbfbom") == ("bom", None)
    assert sources.decode_caption(LATIN1.encode("latin-1")) == (LATIN1, "cp1252")
    assert sources.decode_caption(b"undefined in cp1252: \x81") == ("undefined in cp1252: \x81", "latin-1")


def test_table_cells_with_paths_to_special_and_outside_files(real, tmp_path):
    """datasets' {bytes, path} cells whose bytes are read from `path`: absolute into another folder
    (followed), a FIFO (never opened), a missing file."""
    os.mkfifo(tmp_path / "fifo.jpg")
    outside = tmp_path / "cache" / "a.jpg"
    outside.parent.mkdir()
    shutil.copy(real / PHOTOS[0], outside)
    cells = [{"bytes": None, "path": p} for p in (str(outside), str(tmp_path / "fifo.jpg"), str(tmp_path / "no.jpg"))]
    table = tmp_path / "data" / "train.parquet"
    table.parent.mkdir()
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"image": pa.array(cells, struct), "text": ["a", "b", "c"]}), table)
    with no_hang():
        _, wheres = split(sources.local_images(table), tmp_path / "out")
    assert [w["reason"] for w in wheres] == ["", "special_file", "not_an_image"]
    assert read_member(wheres[0]["src"], wheres[0]["offset"], wheres[0]["size"]) == outside.read_bytes()


def test_measure_never_opens_a_file_that_became_special(tmp_path):
    """The Ray task that reads an image checks its type again (the file may change after the split)."""
    from common import config
    from curation import pipeline

    os.mkfifo(tmp_path / "x.jpg")
    row = {"key": "0", "url": None, "reason": "", "src": str(tmp_path / "x.jpg"), "offset": 0, "size": 10}
    with no_hang():
        assert pipeline.measure(row, config.load(profile="demo").curation)["reason"] == "special_file"


# ---------------------------------------------------------------------------------------------
# Unreadable files: root reads mode-000 files, so the reading process runs without CAP_DAC_OVERRIDE
# ---------------------------------------------------------------------------------------------


def unprivileged() -> list[str]:
    """A command prefix under which mode-000 files cannot be read: none for a non-root user; for root,
    capsh dropping the capabilities that bypass file permissions (inherited by every child: Ray workers)."""
    if os.geteuid() != 0:
        return []
    capsh = shutil.which("capsh")
    if not capsh:
        pytest.skip("root without capsh: a mode-000 file would be readable")
    probe = subprocess.run([capsh, "--drop=cap_dac_override,cap_dac_read_search", "--", "-c", "true"])
    if probe.returncode:
        pytest.skip("capsh cannot drop capabilities here")
    return [capsh, "--drop=cap_dac_override,cap_dac_read_search", "--", "-c", '"$0" "$@"']


@pytest.fixture
def unreadable_folder(real, tmp_path):
    """Real photos, one unreadable (mode 000), one whose caption is, a folder that cannot be listed, a
    FIFO and a latin-1 caption; permissions restored afterwards so pytest can clean up."""
    d = tmp_path / "in"
    (d / "locked").mkdir(parents=True)
    names = ["ok.jpg", "no-read.jpg", "caption-locked.jpg", "locked/inside.jpg"]
    for name, photo in zip(names, [*PHOTOS, PHOTOS[0]]):
        shutil.copy(real / photo, d / name)
    (d / "ok.txt").write_bytes(LATIN1.encode("latin-1"))
    (d / "caption-locked.txt").write_text("you may not read me")
    os.mkfifo(d / "fifo.jpg")
    locked = [d / "no-read.jpg", d / "caption-locked.txt", d / "locked"]
    for p in locked:
        p.chmod(0)
    yield d
    for p in locked:
        p.chmod(0o755)


def test_unreadable_files_are_rows_in_the_split(unreadable_folder, tmp_path):
    """The split as a process that may not read them: each a row `unreadable`, in one pass, no hang."""
    prefix = unprivileged()
    out = tmp_path / "out"
    script = (
        "import json, sys; from pathlib import Path; from curation import sources; "
        "s, work = sources.local_images(sys.argv[1]), Path(sys.argv[2]) / '_work'; n = s.split(work / 'input', 100); "
        "print(json.dumps([r for i in range(n) for r in s.shard_rows(work, None, i, None)]))"
    )
    r = subprocess.run(
        [*prefix, sys.executable, "-c", script, str(unreadable_folder), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert r.returncode == 0, r.stderr
    items = pd.concat([pd.read_parquet(f) for f in sorted((out / "_work" / "input").glob("*.parquet"))])
    reason = {Path(s).name: w["reason"] for s, w in zip(items["source"], json.loads(r.stdout))}
    assert reason == {
        "ok.jpg": "",
        "no-read.jpg": "unreadable",
        "caption-locked.jpg": "unreadable",
        "fifo.jpg": "special_file",
        "locked": "unreadable",  # a folder it may not list: its images are unknown, the folder is the row
    }


def test_an_unreadable_tar_is_a_row_and_an_unreadable_input_one_line(hostile_tar, tmp_path):
    """Among tars, one the process may not read is one row (its members cannot be listed); a folder or
    table given as the input that it may not read is a one-line error, before anything runs."""
    prefix = unprivileged()
    d = tmp_path / "tars"
    d.mkdir()
    shutil.copy(hostile_tar[0] / "00000.tar", d / "00000.tar")
    shutil.copy(hostile_tar[0] / "00000.tar", d / "00001.tar")
    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"image": [b"x"]}), table)
    locked = tmp_path / "locked"
    locked.mkdir()
    for p in (d / "00001.tar", table, locked):
        p.chmod(0)
    script = (
        "import json, sys; from pathlib import Path; from curation import sources; "
        "s, work = sources.local_images(sys.argv[1]), Path(sys.argv[2]) / '_work'; n = s.split(work / 'input', 100); "
        "print(json.dumps([r for i in range(n) for r in s.shard_rows(work, None, i, None)]))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        r = subprocess.run([*prefix, sys.executable, "-c", script, str(d), str(tmp_path / "out")], **RUN, env=env)
        assert r.returncode == 0, r.stderr
        rows = json.loads(r.stdout)
        assert len(rows) == 16 and rows[-1]["reason"] == "unreadable"  # 15 samples of 00000.tar, then 00001.tar
        for spec in (table, locked):
            run = [*prefix, sys.executable, str(ROOT / "curation" / "run.py"), "--images", str(spec)]
            r = subprocess.run([*run, "--out", str(tmp_path / "o"), "--profile", "demo"], **RUN, env=env)
            assert r.returncode == 2 and r.stderr.strip().splitlines() == [
                f"error: {spec}: cannot read (Permission denied)"
            ], r.stderr
    finally:
        for p in (d / "00001.tar", table, locked):
            p.chmod(0o755)


def test_run_without_read_permission_goes_on(unreadable_folder, tiny_models, tmp_path):
    """The real entry point and its own local Ray, as a process (and workers) that cannot read the
    mode-000 files: exit 0, one manifest row per item, no traceback, captions decoded and counted."""
    prefix = unprivileged()
    out = tmp_path / "out"
    r = subprocess.run(
        [
            *prefix,
            sys.executable,
            str(ROOT / "curation" / "run.py"),
            "--images",
            str(unreadable_folder),
            "--out",
            str(out),
            *SETTINGS,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ""},
    )
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    m = pd.read_parquet(out / "manifest.parquet")
    reason = {Path(s).name: (st, why) for s, st, why in zip(m["source"], m["status"], m["reason"])}
    assert {k: v for k, v in reason.items() if v[0] == "failed"} == {
        "no-read.jpg": ("failed", "unreadable"),
        "caption-locked.jpg": ("failed", "unreadable"),
        "locked": ("failed", "unreadable"),
        "fifo.jpg": ("failed", "special_file"),
    }
    assert reason["ok.jpg"][0] in ("kept", "rejected")  # measured and decided: it was read
    assert m.loc[m["source"].str.endswith("ok.jpg"), "caption"].item() == LATIN1
    stats = json.loads((out / "stats.json").read_text())
    assert stats["urls"] == 5 and stats["captions_not_utf8"] == {"cp1252": 1}
    assert "source shard 00000: 4 images scored" in r.stdout and "URL" not in r.stdout + r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["images"] == 5
    assert "note: 1 caption files not in UTF-8: decoded as cp1252 (1)" in r.stderr


# ---------------------------------------------------------------------------------------------
# The real entry point on a local Ray: what the manifest and the summary say
# ---------------------------------------------------------------------------------------------


def curate(capsys, *argv) -> tuple[pd.DataFrame, dict, str, str]:
    """(manifest, printed summary, stdout, stderr) of the entry point in this process."""
    from curation import run as cli

    out = Path(argv[argv.index("--out") + 1])
    cli.main([*argv, *SETTINGS])
    said = capsys.readouterr()
    return pd.read_parquet(out / "manifest.parquet"), json.loads(said.out.splitlines()[-1]), said.out, said.err


def test_run_over_a_hostile_tar_accounts_for_every_member(ray_local, tiny_models, hostile_tar, tmp_path, capsys):
    d, _ = hostile_tar
    with no_hang(600):
        m, summary, out, err = curate(capsys, "--images", str(d), "--out", str(tmp_path / "out"))
    tar = f"{d / '00000.tar'}::"
    reason = dict(zip(m["source"].str.removeprefix(tar), m["reason"].fillna("")))
    assert len(m) == summary["images"] == 15 and m["key"].is_unique
    assert {k for k, v in reason.items() if v == "unresolved_link"} == {f"000{i}.jpg" for i in range(5, 10)}
    assert reason["0011.jpg"] == "special_file"
    measured = ["0000.jpg", "0001.jpg", "0002.jpg", "sub/0003.jpg", "0004.jpg", "0010.jpg", "0010.jpg#2"]
    assert all(reason[k] not in ("unresolved_link", "special_file", "not_an_image") for k in measured)
    by = m.set_index(m["source"].str.removeprefix(tar))
    assert by.loc["0001.jpg", "sha256"] == by.loc["0000.jpg", "sha256"] == by.loc["0010.jpg", "sha256"]  # links
    assert by.loc["0010.jpg#2", "caption"] == "second of 0010" and by.loc["0012.jpg", "caption"] == LATIN1
    assert "source shard 00000: 15 images scored" in out and "URL" not in out and "download" not in out
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["urls"] == 15 and stats["captions_not_utf8"] == {"cp1252": 1}  # stats.json keeps its keys
    page = (tmp_path / "out" / "report.html").read_text()
    assert ": 15 images</p>" in page and "examples (file)" in page and f"{tar}0005.jpg" in page


def resized(real: Path, folder: Path, photos: list[str]) -> Path:
    """Real photos resized into 256x256 and re-encoded, as img2dataset's defaults leave them."""
    from PIL import Image

    folder.mkdir()
    for i, name in enumerate(photos):
        Image.open(real / name).convert("RGB").resize((256, 256)).save(folder / f"{i:09d}.jpg", quality=95)
    return folder


@pytest.fixture(scope="module")
def small_run(ray_local, tiny_models, real, tmp_path_factory):
    """One finished run over img2dataset-default-like output: (folder, out, stdout, stderr)."""
    from contextlib import redirect_stderr, redirect_stdout

    from curation import run as cli

    tmp = tmp_path_factory.mktemp("small")
    d = resized(real, tmp / "i2d-default", PHOTOS + ["mate_nature_YellowFlower.jpg"])
    said, err = io.StringIO(), io.StringIO()
    with redirect_stdout(said), redirect_stderr(err):
        cli.main(["--images", str(d), "--out", str(tmp / "out"), *SETTINGS])
    return d, tmp / "out", said.getvalue(), err.getvalue()


def test_most_images_of_one_small_size_are_explained(small_run):
    """img2dataset's default output (every photo resized into 256x256, re-encoded): all too_small, and the
    summary says why and which flags keep the originals."""
    _, out, said, err = small_run
    m, summary = pd.read_parquet(out / "manifest.parquet"), json.loads(said.splitlines()[-1])
    assert summary["kept"] == 0 and (m["reason"] == "too_small").all()
    notes = [line for line in err.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and "4 of 4 images are 256x256" in notes[0]
    assert "--resize_mode no --disable_all_reencoding True" in notes[0]
    readme = (ROOT / "README.md").read_text()
    assert "--resize_mode no --disable_all_reencoding True" in readme


def test_another_folder_of_the_same_names_and_sizes_is_refused(small_run, real, tmp_path, capsys):
    """Issue 28: a second folder, the same file names and sizes, other pixels, into the same --out: refused
    in one line (the v1 fingerprint saw names and sizes only and returned the first folder's results)."""
    from curation import run as cli

    first, out, _, _ = small_run
    other = resized(real, tmp_path / "other", ["mate_abstract_Spring.png", PHOTOS[2], PHOTOS[0], PHOTOS[1]])
    for a, b in zip(sorted(first.iterdir()), sorted(other.iterdir())):  # the same sizes: cut or padded
        data = b.read_bytes()
        size = a.stat().st_size
        b.write_bytes(data[:size] + b"\0" * (size - len(data)))
        assert b.name == a.name and b.stat().st_size == size and b.read_bytes() != a.read_bytes()
    with pytest.raises(SystemExit) as e:
        cli.main(["--images", str(other), "--out", str(out), *SETTINGS])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code != 0 and len(err) == 1 and "made with another --images" in err[0]


def test_a_folder_fingerprinted_by_the_v1_rule_resumes_as_it_is(small_run, capsys):
    """A finished run whose fingerprint.json holds the v1 listing (names and sizes) is accepted as it is."""
    import hashlib

    from curation import run as cli
    from shards import fingerprint

    d, out, said, _ = small_run
    h = hashlib.sha256()
    for p in sorted(d.iterdir()):  # the v1 rule, as it was written
        h.update(f"{p.name}\t{p.stat().st_size}\n".encode())
    fp = json.loads((out / fingerprint.FILE).read_text())
    assert fp["--images"].startswith("folder v2:")
    (out / fingerprint.FILE).write_text(json.dumps({**fp, "--images": f"folder {h.hexdigest()}"}))
    cli.main(["--images", str(d), "--out", str(out), *SETTINGS])
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == json.loads(said.splitlines()[-1])
    assert json.loads((out / fingerprint.FILE).read_text()) == fp  # recorded by v2 from now on
