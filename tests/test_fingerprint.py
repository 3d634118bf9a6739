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
