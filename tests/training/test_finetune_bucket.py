"""training/finetune with --data in a bucket (moto's S3 server on loopback): the same run as from disk,
two gloo ranks sharing one cache folder, and the one-line errors of a missing bucket or ENCDIR."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tests.training import encdata
from training import checkpoint, finetune

ROOT = Path(__file__).resolve().parents[2]
STEPS = 3
COMMON = ("--set", "training.stages.512.parent=null", "--set", f"training.checkpoint_every={STEPS}")


def _losses(log: Path) -> list[float]:
    return [float(x) for x in re.findall(r"step \d+/\d+ loss ([\d.]+)", log.read_text())]


def _weights(run: Path) -> dict:
    return checkpoint.load_weights(run / "512" / "checkpoints" / f"step-{STEPS:07d}" / "model.safetensors")


@pytest.fixture
def enc(tmp_path, bucket):
    """A 512 ENCDIR on disk and the same in the bucket: (path, URL)."""
    import s3fs

    local = encdata.write(tmp_path / "enc", "512", {(64, 64): 6, (48, 80): 6})
    s3fs.S3FileSystem(skip_instance_cache=True).put(str(local), bucket[5:] + "/enc", recursive=True)
    return local, bucket + "/enc"


def test_a_run_from_the_bucket_equals_the_run_from_disk(enc, tmp_path, capsys):
    local, url = enc
    finetune.main(encdata.args("512", local, tmp_path / "disk", *COMMON, steps=STEPS))
    cache = tmp_path / "cache"
    finetune.main(
        encdata.args("512", url, tmp_path / "bucket", *COMMON, "--set", f"storage.cache.folder={cache}", steps=STEPS)
    )
    out = capsys.readouterr().out
    assert f"data {url}" in out
    a, b = _losses(tmp_path / "disk" / "512" / "log.txt"), _losses(tmp_path / "bucket" / "512" / "log.txt")
    assert len(a) == STEPS and b == a
    wa, wb = _weights(tmp_path / "disk"), _weights(tmp_path / "bucket")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert any(p.name.endswith(".tar") for p in cache.iterdir())  # read through the cache


def test_two_gloo_ranks_share_one_cache_folder(enc, tmp_path):
    local, url = enc
    one = tmp_path / "one"
    finetune.main(encdata.args("512", local, one, *COMMON, "--set", "training.stages.512.grad_accum=2", steps=STEPS))
    cache = tmp_path / "cache"
    r = encdata.torchrun(
        encdata.args("512", url, tmp_path / "two", *COMMON, "--set", f"storage.cache.folder={cache}", steps=STEPS)
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert _losses(tmp_path / "two" / "512" / "log.txt") == pytest.approx(_losses(one / "512" / "log.txt"), rel=1e-4)
    wa, wb = _weights(one), _weights(tmp_path / "two")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)
    entries = [p.name for p in cache.iterdir() if not p.name.startswith(".")]
    tars = sorted(p.relative_to(local).as_posix() for p in local.rglob("*.tar"))
    assert len([e for e in entries if e.endswith(".tar")]) <= len(tars)  # one copy per object, whatever reads it
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]


def test_a_missing_bucket_or_encdir_is_one_line(s3_server, bucket, tmp_path, capsys):
    for url, says in (
        ("s3://no-such-bucket-sigmaforge/enc", "the bucket does not exist"),
        (bucket + "/no-enc", "not an encoded dataset"),
    ):
        with pytest.raises(SystemExit):
            finetune.main(encdata.args("512", url, tmp_path / "runs", *COMMON, steps=1))  # type: ignore[arg-type]
        err = capsys.readouterr().err.strip()
        assert url in err and says in err and len(err.splitlines()) == 1, err
