"""Pure curation steps on real image bytes: tiers, decode-safe metadata, quality, dedup, URL checks."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from curation import dedup, download, metadata, pipeline, quality
from demo.images import encode, render
from demo.serve import huge_png, sample_jpeg
from shards import buckets, reasons
from tests.curation import oracle


@pytest.mark.parametrize(
    "w,h,tier",
    [
        (1024, 1024, "1k"),
        (2048, 2048, "2k"),
        (2880, 2880, "4k"),
        (1344, 768, "1k"),
        (2047, 2048, "1k"),
        (3840, 2160, "4k"),
        (2560, 1440, "1k"),  # its 2k bucket (0.57) is 1536 x 2688
        (1023, 1024, None),
        (800, 600, None),
    ],
)
def test_tier_rule(w, h, tier):
    assert buckets.tier_of(h, w) == tier
    verdict = pipeline.size_verdict(h, w, "1k")
    assert verdict == (None if tier else reasons.TOO_SMALL)


def test_size_verdict_aspect_and_min_tier():
    assert pipeline.size_verdict(1000, 4400, "1k") == reasons.ASPECT_RATIO
    assert pipeline.size_verdict(4400, 1000, "1k") == reasons.ASPECT_RATIO
    assert pipeline.size_verdict(1024, 1024, "2k") == reasons.TOO_SMALL
    assert pipeline.size_verdict(2048, 2048, "2k") is None


def test_inspect_sizes_formats_and_faults():
    for fmt, ext in (("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")):
        info = metadata.inspect(encode(render(0, 640, 480), fmt), 64_000_000)
        assert (info.reason, info.width, info.height, info.ext) == (None, 640, 480, ext)
        assert max(info.grey.size) <= metadata.WORK_SIDE and info.grey.mode == "L"
    jpeg = sample_jpeg(256, 256)
    assert metadata.inspect(jpeg[: len(jpeg) // 2], 64_000_000).reason == reasons.NOT_AN_IMAGE
    assert metadata.inspect(b"<html>hi</html>", 64_000_000).reason == reasons.NOT_AN_IMAGE
    assert metadata.inspect(b"", 64_000_000).reason == reasons.NOT_AN_IMAGE
    assert metadata.inspect(huge_png(), 64_000_000).reason == reasons.DECOMPRESSION_BOMB
    assert metadata.inspect(huge_png(9000, 8000), 64_000_000).width == 9000  # caught by our cap, size known
    assert metadata.inspect(jpeg, 256 * 256 - 1).reason == reasons.DECOMPRESSION_BOMB  # the cap is configurable
    gif = io.BytesIO()
    Image.new("RGB", (64, 64)).save(gif, "GIF")
    assert metadata.inspect(gif.getvalue(), 64_000_000).reason == reasons.UNSUPPORTED_FORMAT  # not a format we keep


def test_inspect_applies_exif_orientation():
    from tests.curation.conftest import exif_rotated

    info = metadata.inspect(exif_rotated(), 64_000_000)
    assert (info.width, info.height) == (1024, 1344)
    assert info.grey.size[1] > info.grey.size[0]  # the working copy is upright too
    thumb = Image.open(io.BytesIO(info.thumb))
    assert thumb.size == (256, 336) and thumb.mode == "RGB"  # what the models read: upright, shortest side 256


def test_quality_metrics_separate_sharp_blurred_flat():
    from PIL import ImageFilter

    sharp = render(3, 512, 512).convert("L")
    blurred = sharp.filter(ImageFilter.GaussianBlur(6))
    flat = Image.new("L", (512, 512), 128)
    m_sharp, m_blur, m_flat = quality.metrics(sharp), quality.metrics(blurred), quality.metrics(flat)
    assert m_sharp["sharpness"] > 20 > m_blur["sharpness"]
    assert m_flat["contrast"] == 0 and m_flat["sharpness"] == 0
    args = (20.0, 10.0, 10.0, 245.0)
    assert quality.verdict(m_sharp, *args) is None
    assert quality.verdict(m_blur, *args) == reasons.LOW_QUALITY
    assert quality.verdict(m_flat, *args) == reasons.LOW_QUALITY
    dark = quality.metrics(Image.eval(sharp, lambda v: v // 40))
    assert quality.verdict(dark, *args) == reasons.LOW_QUALITY


def test_dedup_keeps_highest_resolution_and_points_at_kept():
    big, other = render(5, 1024, 1024), render(6, 1024, 1024)
    small = big.resize((600, 600), Image.LANCZOS)
    ph = [dedup.phash_hex(im.convert("L")) for im in (small, big, other)]
    keys, pixels = ["a", "b", "c", "d"], [600 * 600, 1024 * 1024, 1024 * 1024, 600 * 600]
    sha = ["s1", "s2", "s3", "s1"]  # d: exact copy of a
    out = oracle.find_duplicates(keys, pixels, sha, ph + [ph[0]], None, 4, None)
    assert out == {"a": "b", "d": "b"}  # a is the small copy of b; d equals a, whose kept member is b
    assert oracle.find_duplicates(keys, pixels, sha, ph + [ph[0]], None, None, None) == {"d": "a"}  # sha only


def test_dedup_clip_similarity():
    rng = np.random.default_rng(0)
    e = rng.normal(size=(3, 8)).astype(np.float32)
    e[1] = e[0] + 0.01 * rng.normal(size=8)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    out = oracle.find_duplicates(["x", "y", "z"], [10, 20, 30], ["1", "2", "3"], [None] * 3, e, None, 0.96)
    assert out == {"x": "y"}


def test_dedup_band_index_finds_every_pair_within_radius():
    rng = np.random.default_rng(1)
    base = int(rng.integers(0, 2**63))
    flips = [
        base ^ (1 << int(b)) ^ (1 << int(c)) ^ (1 << int(d)) ^ (1 << int(f))
        for b, c, d, f in rng.integers(0, 64, size=(20, 4))
    ]
    ph = [f"{base:016x}"] + [f"{h:016x}" for h in flips]
    out = oracle.find_duplicates(
        [f"{i:02d}" for i in range(21)], [100] + [1] * 20, [str(i) for i in range(21)], ph, None, 4, None
    )
    assert set(out) == {f"{i:02d}" for i in range(1, 21)} and set(out.values()) == {"00"}


@pytest.mark.parametrize(
    "url,bad",
    [
        ("http://a.example/x.jpg", False),
        ("HTTPS://a.example/x", False),
        ("ftp://a.example/x.jpg", True),
        ("file:///etc/passwd", True),
        ("data:image/png;base64,AAAA", True),
        ("no scheme", True),
        ("http://", True),
        (None, True),
    ],
)
def test_invalid_url(url, bad):
    assert download.invalid_url(url) is bad


def test_credentials_are_dropped_so_the_host_is_what_is_checked():
    from curation import fetch

    assert fetch.without_credentials("http://u:p@127.0.0.1:8080/x.jpg?a=1") == "http://127.0.0.1:8080/x.jpg?a=1"
    assert fetch.without_credentials("https://a.example/x@y.jpg") == "https://a.example/x@y.jpg"


def test_reason_codes_travel_as_data_not_in_messages():
    from curation import fetch, robots

    unreachable = robots.parse_rules(None, 503, "http_503", "Service Unavailable")
    assert unreachable.refusal("http://a.example/x.jpg", ["sigmaforge"]) == (
        "http_503",
        "Service Unavailable (robots.txt)",
    )
    assert robots.parse_rules(None, 404, "http_404", "Not Found").refusal("http://a.example/x.jpg", ["x"]) is None
    disallow = robots.parse_rules(b"User-agent: sigmaforge\nDisallow: /private\n", 200, None, "")
    assert disallow.refusal("http://a.example/private/x.jpg", ["sigmaforge"])[0] == reasons.OPT_OUT
    result = fetch.Result(reason=reasons.TIMEOUT, detail="past max_seconds 30")
    assert result.reason == "timeout" and result.error == "timeout: past max_seconds 30"  # message only for people
