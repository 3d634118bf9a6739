"""pipelines.yaml validation: every error is one line naming the key path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from common import config
from shards.errors import SigmaError

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path, data) -> Path:
    p = tmp_path / "pipelines.yaml"
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return p


def base() -> dict:
    return yaml.safe_load((ROOT / "pipelines.yaml").read_text())


def at(data: dict, path: str) -> dict:
    """The mapping at a dotted path of a raw config, made if pipelines.yaml leaves it to the defaults."""
    for k in path.split("."):
        data = data.setdefault(k, {})
    return data


def test_shipped_config_loads_in_every_profile():
    for profile in (None, "real", "demo"):
        cfg = config.load(ROOT / "pipelines.yaml", profile)
        assert set(cfg.training.stages) == {"256", "vae", "512", "1k", "2k", "4k", "kv"}
        assert cfg.training.stages["2k"].parent == "1k"
    real, demo = config.load(profile="real"), config.load(profile="demo")
    assert real.models.t5 == "google/t5-v1_1-xxl" and real.curation.aesthetic.enabled
    assert demo.models.t5.endswith("tiny/t5") and Path(demo.models.t5).is_absolute()  # .cache/tiny or the user cache
    assert not demo.curation.aesthetic.enabled  # random tiny head never drops images
    assert demo.training.stages["256"].steps < real.training.stages["256"].steps
    import inspect

    from demo.serve import ImageServer

    assert real.curation.download.allow_networks == []  # the web only, unless the operator says otherwise
    serve_host = inspect.signature(ImageServer).parameters["host"].default
    assert demo.curation.download.allow_networks == [f"{serve_host}/32"]  # exactly the demo server's address


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda d: d["training"]["stages"]["2k"].update(lr="fast"),
            "training.stages.2k.lr: expected float, got 'fast'",
        ),
        (lambda d: at(d, "curation").update(colour="red"), "curation.colour: unknown key"),
        (
            lambda d: at(d, "curation.download").update(timeout="10s"),
            "curation.download.timeout: expected int, got '10s'",
        ),
        (
            lambda d: at(d, "curation").update(min_tier="8k"),
            "curation.min_tier: expected one of ['1k', '2k', '4k'], got '8k'",
        ),
        (
            lambda d: d["training"]["stages"]["kv"].update(kv_compress_layers="all"),
            "training.stages.kv.kv_compress_layers: expected a list",
        ),
        (
            lambda d: at(d, "curation.aesthetic").update(enabled="yes"),
            "curation.aesthetic.enabled: expected bool, got 'yes'",
        ),
        (lambda d: d.update(models=[1, 2]), "models: expected a mapping"),
        (
            lambda d: d["captioning"]["captioners"]["hf"].update(backend="gpt"),
            "captioning.captioners.hf.backend: expected one of",
        ),
        (
            lambda d: at(d, "curation.download").update(allow_networks=["10.0.0.1/8"]),
            "curation.download.allow_networks[0]: not a CIDR",
        ),
        (
            lambda d: at(d, "curation.download").update(max_bytes=0),
            "curation.download.max_bytes: 0 is out of range (expected >= 1)",
        ),
        (
            lambda d: at(d, "curation.download").update(max_seconds=0),
            "curation.download.max_seconds: 0.0 is out of range (expected > 0)",
        ),
        (
            lambda d: at(d, "curation.download").update(per_domain_limit=1000),
            "curation.download.per_domain_limit: 1000 is out of range (expected >= 1 and <= 256)",
        ),
        (
            lambda d: at(d, "curation.download").update(contact="me"),
            "curation.download.contact: expected an http(s)://",
        ),
        (lambda d: at(d, "curation.download").update(robots_txt="yes"), "curation.download.robots_txt: expected bool"),
        (
            lambda d: at(d, "curation").update(measure_seconds=-1),
            "curation.measure_seconds: -1.0 is out of range (expected > 0)",
        ),
    ],
)
def test_bad_values_name_the_key_path(tmp_path, mutate, message):
    data = base()
    mutate(data)
    with pytest.raises(SigmaError) as e:
        config.load(write(tmp_path, data))
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(SigmaError, match="config file not found"):
        config.load(tmp_path / "missing.yaml")
    with pytest.raises(SigmaError, match="not valid YAML"):
        config.load(write(tmp_path, "models: [unclosed"))
    with pytest.raises(SigmaError, match=r"not valid YAML \(duplicate key 'timeout' at line 4\)"):
        config.load(write(tmp_path, "curation:\n  download: {retries: 1}\n  timeout: 1\n  timeout: 2\n"))
    with pytest.raises(SigmaError, match=r"profiles.nope: no such profile"):
        config.load(ROOT / "pipelines.yaml", "nope")


def test_overrides_apply_after_profile():
    cfg = config.load(
        profile="demo", overrides=["training.stages.256.batch_size=3", "curation.aesthetic.threshold=6.5"]
    )
    assert cfg.training.stages["256"].batch_size == 3
    assert cfg.curation.aesthetic.threshold == 6.5
    with pytest.raises(SigmaError, match="training.stages.256.batch_size: expected int"):
        config.load(profile="demo", overrides=["training.stages.256.batch_size=big"])
    with pytest.raises(SigmaError, match="expected key=value"):
        config.load(overrides=["training.out"])


def test_missing_required_file_is_one_line():
    with pytest.raises(SigmaError, match=r"^models.aesthetic_head: file not found: /nope.pth$"):
        config.require_file("/nope.pth", "models.aesthetic_head")


def test_entry_point_reports_config_error_without_traceback(tmp_path):
    data = base()
    data["training"]["stages"]["2k"]["lr"] = "fast"
    bad = write(tmp_path, data)
    code = (
        "import sys; from common import cli; p = cli.parser('x', 'd', 'x --config f'); "
        "cli.load(p.parse_args(sys.argv[1:]))"
    )
    r = subprocess.run([sys.executable, "-c", code, "--config", str(bad)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: training.stages.2k.lr: expected float, got 'fast'"


@pytest.mark.parametrize(
    "override, message",
    [
        ("curation.download.shard_size=0", "curation.download.shard_size: 0 is out of range (expected >= 1)"),
        ("curation.shard_size=0", "curation.shard_size: 0 is out of range (expected >= 1)"),
        ("curation.download.timeout=-1", "curation.download.timeout: -1 is out of range (expected >= 1)"),
        ("curation.dedup.phash_radius=-2", "curation.dedup.phash_radius: -2 is out of range (expected >= 0 and <= 64)"),
        ("curation.max_pixels=0", "curation.max_pixels: 0 is out of range (expected >= 1)"),
        ("curation.aesthetic_resources.batch_size=0", "curation.aesthetic_resources.batch_size: 0 is out of range"),
        ("encode.shard_bytes=0", "encode.shard_bytes: 0 is out of range"),
        ("captioning.captioners.hf.max_new_tokens=0", "captioning.captioners.hf.max_new_tokens: 0 is out of range"),
        (
            "training.stages.1k.cfg_dropout=1.5",
            "training.stages.1k.cfg_dropout: 1.5 is out of range (expected >= 0 and <= 1)",
        ),
        ("training.stages.1k.lr=0", "training.stages.1k.lr: 0.0 is out of range (expected > 0)"),
    ],
)
def test_numbers_out_of_range_are_refused_at_load(override, message):
    with pytest.raises(SigmaError) as e:
        config.load(ROOT / "pipelines.yaml", "demo", [override])
    assert str(e.value) == message or str(e.value).startswith(message)
    assert "\n" not in str(e.value)


def test_every_numeric_key_has_a_range():
    import dataclasses
    import typing

    def numeric(tp):
        return tp in (int, float) or any(a in (int, float) for a in typing.get_args(tp))

    missing = []
    for cls in [v for v in vars(config).values() if dataclasses.is_dataclass(v) and isinstance(v, type)]:
        hints = typing.get_type_hints(cls)
        missing += [
            f"{cls.__name__}.{f.name}"
            for f in dataclasses.fields(cls)
            if numeric(hints[f.name]) and "range" not in f.metadata
        ]
    assert missing == []


# ---------------------------------------------------------------------------------------------
# Values as people write them, and one source of defaults
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, key, want",
    [
        ("training.stages.2k.lr=1e-5", "lr", 1e-5),  # README's own example; YAML 1.1 reads `1e-5` as a string
        ("training.stages.2k.lr=1E-5", "lr", 1e-5),
        ("training.stages.2k.lr=2.5e-6", "lr", 2.5e-6),
        ("training.stages.2k.cfg_dropout=1e-1", "cfg_dropout", 0.1),
        ("training.stages.2k.steps=10_000", "steps", 10_000),
        ("training.stages.2k.steps=1e4", "steps", 10_000),  # an exponent that makes a whole number is an int
        ("training.stages.2k.grad_clip=1e1", "grad_clip", 10.0),
    ],
)
def test_exponents_and_underscores_are_numbers_on_the_command_line(override, key, want):
    value = getattr(config.load(ROOT / "pipelines.yaml", "demo", [override]).training.stages["2k"], key)
    assert value == want and type(value) is type(want)


def test_exponents_and_underscores_are_numbers_in_yaml(tmp_path):
    text = (
        "curation:\n  max_pixels: 5e8\n  download: {shard_size: 10_000, max_bytes: 1e6, max_seconds: 3e1}\n"
        "training:\n  stages:\n    a: {lr: 1e-5, steps: 2_000}\n"
    )
    cfg = config.load(write(tmp_path, text))
    assert cfg.curation.max_pixels == 500_000_000 and type(cfg.curation.max_pixels) is int
    assert (cfg.curation.download.shard_size, cfg.curation.download.max_bytes) == (10_000, 1_000_000)
    assert cfg.curation.download.max_seconds == 30.0
    assert (cfg.training.stages["a"].lr, cfg.training.stages["a"].steps) == (1e-5, 2_000)


@pytest.mark.parametrize(
    "override, message",
    [
        ("training.stages.2k.steps=1.5e0", "training.stages.2k.steps: expected int, got '1.5e0'"),
        ("training.stages.2k.steps=2.5", "training.stages.2k.steps: expected int, got 2.5"),
        ("training.stages.2k.lr=1e-5x", "training.stages.2k.lr: expected float, got '1e-5x'"),
        ("training.stages.2k.lr=nan", "training.stages.2k.lr: expected float, got 'nan'"),
        ("training.stages.2k.lr=1e999", "training.stages.2k.lr: expected float, got '1e999'"),
        ("training.stages.2k.lr=-1e-5", "training.stages.2k.lr: -1e-05 is out of range (expected > 0)"),
        ("training.stages.2k.tier=1e3", None),  # a str key keeps what was written
    ],
)
def test_what_is_not_a_number_of_the_key_s_kind_is_refused(override, message):
    if message is None:
        assert config.load(ROOT / "pipelines.yaml", "demo", [override]).training.stages["2k"].tier == "1e3"
        return
    with pytest.raises(SigmaError) as e:
        config.load(ROOT / "pipelines.yaml", "demo", [override])
    assert str(e.value) == message


def _field_at(path: list[str]):
    """The dataclass field a key path of pipelines.yaml sets, and whether it is inside a named entry."""
    import dataclasses
    import typing

    tp, f, in_entry = config.Config, None, False
    for k in path:
        if typing.get_origin(tp) is dict:  # a named entry (a stage, a captioner): pipelines.yaml is its source
            tp, f, in_entry = typing.get_args(tp)[1], None, True
            continue
        if not dataclasses.is_dataclass(tp):
            return f, in_entry
        f = {x.name: x for x in dataclasses.fields(tp)}[k]
        tp = typing.get_type_hints(tp)[k]
        if typing.get_origin(tp) is not dict:  # Optional[Section] -> Section
            tp = next((a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)), tp)
    return f, in_entry


def _leaves(data: dict, prefix: tuple = ()):
    for k, v in data.items():
        if isinstance(v, dict) and v:
            yield from _leaves(v, prefix + (str(k),))
        else:
            yield prefix + (str(k),), v


def test_every_default_is_stated_once():
    """A key's default lives in its dataclass (common/config.py); pipelines.yaml's base states only the
    named entries (stages, captioners) and the profiles, which override the defaults on purpose."""
    raw = base()
    raw.pop("profiles")
    twice = [".".join(p) for p, _ in _leaves(raw) if not _field_at(list(p))[1]]
    assert twice == [], f"stated in pipelines.yaml and as a dataclass default in common/config.py: {twice}"


def test_code_built_sections_carry_the_shipped_defaults():
    """Code that builds a section itself (tests, curation/report.py) gets the same values as a load."""
    loaded = config.load(ROOT / "pipelines.yaml")
    assert config.CurationConfig() == loaded.curation
    assert config.EncodeConfig() == loaded.encode
    assert config.DownloadConfig().processes == loaded.curation.download.processes == 8
    assert (
        config.load(ROOT / "pipelines.yaml", "demo").curation.aesthetic.threshold == 5.0
    )  # kept beside enabled: false
