"""Every command line README.md shows, and every entry point's `--help` example, runs with --dry-run.

The commands are read from the files (README code blocks, the `example:` of each `--help`), never
copied here, so a changed README is tested as it reads. They run in an empty folder: the data they
name does not exist, and a dry run must say what it could not check rather than fail.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from demo import run as demo_run

REPO = Path(__file__).resolve().parent.parent
STAGES = ("curation", "captioning", "encoding", "training", "evaluation")
CONVERTERS = ("curation/convert_nsfw_head",)  # one-off tools run in another env (TensorFlow): no shared flags
PLACEHOLDER = re.compile(r"^[A-Z][A-Z_]+$")  # CAPDIR, NAME: a synopsis' stand-in for a value
LAUNCHERS = ("python", "python3", "ray", "torchrun")  # what may stand before an entry point on a line


def entry_points() -> list[str]:
    """Executable scripts of the stage folders (`training/finetune`, `curation/run.py`, ...)."""
    found = []
    for folder in STAGES:
        for p in sorted((REPO / folder).glob("*")) if (REPO / folder).is_dir() else []:
            name = f"{folder}/{p.name}"
            if p.is_file() and os.access(p, os.X_OK) and p.read_text(errors="replace").startswith("#!"):
                found.append(name)
    return found


def _code_lines(markdown: str) -> list[str]:
    """Lines of the ``` blocks, continuation lines (trailing backslash) joined, comments dropped."""
    lines, block, pending = [], False, ""
    for raw in markdown.splitlines():
        if raw.lstrip().startswith("```"):
            block, pending = not block, ""
            continue
        if not block:
            continue
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        lines.append(line)
    return lines


def _command(line: str, names: list[str]) -> list[str] | None:
    """argv from the entry point on (`ray job submit ... --`, `torchrun ...`, `python` dropped), or None."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return None
    if not words or not (words[0] in names or words[0] in LAUNCHERS or words[0].endswith("/python")):
        return None  # prose in a code block (the data-flow diagram), another tool
    for i, w in enumerate(words):
        if w in names:
            # optional parts are shown as [--flag value]: run them too
            return [x.strip("[]") for x in words[i:] if x.strip("[]")]
    return None


def pipeline_entry_points() -> list[str]:
    """The entry points with the shared flags (--config, --profile, --set, --dry-run)."""
    return [n for n in entry_points() if n not in CONVERTERS]


def readme_commands(readme: Path = REPO / "README.md") -> list[list[str]]:
    names = pipeline_entry_points()
    out = []
    for line in _code_lines(readme.read_text()):
        argv = _command(line, names)
        # a synopsis (`--set key=value ...`, `--out CAPDIR`, `--captioner NAME`) shows the flags, it is not
        # a command line
        if (
            argv
            and argv[1:] != ["--help"]
            and not any(a in ("...", "…", "key=value") or PLACEHOLDER.match(a) for a in argv)
        ):
            out.append(argv)
    return out


def folder_readme_commands() -> list[list[str]]:
    return [argv for md in sorted(REPO.glob("*/README.md")) for argv in readme_commands(md)]


def help_examples(name: str) -> list[list[str]]:
    """The command lines under `example:` in an entry point's --help (one per line)."""
    r = subprocess.run(
        [sys.executable, str(REPO / name), "--help"], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert r.returncode == 0, f"{name} --help: {r.stderr[-2000:]}"
    assert "example:" in r.stdout, f"{name} --help has no example"
    lines = r.stdout.split("example:", 1)[1].strip().splitlines()
    examples = [
        argv for argv in (_command(x, [name]) for x in _code_lines("```\n" + "\n".join(lines) + "\n```")) if argv
    ]
    assert examples, f"{name} --help: its example does not run {name}: {lines}"
    return examples


def dry_run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, str(REPO / argv[0]), *argv[1:], "--dry-run"],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
    )


def test_readme_commands_are_found():
    """The extraction sees the README's commands (a change of layout must not make the test vacuous)."""
    commands = readme_commands()
    heads = {c[0] for c in commands}
    assert {"curation/run.py", "captioning/recaption", "encoding/encode", "training/finetune"} <= heads, heads
    assert len(commands) >= 10, commands


def _buckets(argv: list[str]) -> set[str]:
    """The buckets a command names (`s3://NAME/...`): a dry run checks they exist (for free), so they must."""
    return {a.split("://", 1)[1].split("/", 1)[0] for a in argv if a.startswith("s3://")}


@pytest.mark.parametrize("argv", readme_commands(), ids=lambda a: " ".join(a)[:80])
def test_readme_command_dry_runs(argv, tmp_path, request):
    if _buckets(argv):  # the README's bucket, on the loopback S3 API (tests/conftest.py)
        import s3fs

        request.getfixturevalue("s3_server")
        fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
        for name in _buckets(argv):
            if not fs.exists(name):
                fs.mkdir(name)
    r = dry_run(argv, tmp_path)
    assert r.returncode == 0, f"{shlex.join(argv)} --dry-run: exit {r.returncode}\n{r.stderr[-3000:]}"
    assert r.stdout.strip(), f"{shlex.join(argv)} --dry-run printed no plan"
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("argv", folder_readme_commands(), ids=lambda a: " ".join(a)[:80])
def test_folder_readme_command_dry_runs(argv, tmp_path):
    r = dry_run(argv, tmp_path)
    assert r.returncode == 0, f"{shlex.join(argv)} --dry-run: exit {r.returncode}\n{r.stderr[-3000:]}"
    assert r.stdout.strip() and "Traceback" not in r.stderr


def test_finetune_dry_run_without_data_says_what_it_could_not_check(tmp_path):
    """training/README.md's `training/finetune --stage 2k --dry-run`: no --data, no parent run yet."""
    r = dry_run(["training/finetune", "--stage", "2k"], tmp_path)
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["stage"] == "2k" and plan["chain"][-2:] == ["1k", "2k"] and plan["init"] is None
    assert any("no data; pass --data ENCDIR" in x for x in plan["not_checked"]), plan["not_checked"]
    assert any("parent stage 1k" in x for x in plan["not_checked"]), plan["not_checked"]
    assert "dry run: not checked: --stage 2k: no data" in r.stderr
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


@pytest.mark.parametrize("name", pipeline_entry_points())
def test_help_examples_dry_run(name, tmp_path):
    for argv in help_examples(name):
        r = dry_run(argv, tmp_path)
        assert r.returncode == 0, f"{shlex.join(argv)} --dry-run: exit {r.returncode}\n{r.stderr[-3000:]}"
        assert r.stdout.strip(), f"{shlex.join(argv)} --dry-run printed no plan"
        assert "Traceback" not in r.stderr


def test_printed_commands_survive_a_shell():
    """The commands `make demo` prints can be pasted into a shell as they are."""
    argv = ["encoding/encode", "--images", "demo out/curated/shards/*.tar", "--prompt", "a fox's {red} tail"]
    assert shlex.split(demo_run.command_line(argv)) == ["python", *argv]


def test_extraction_joins_continuations_and_strips_wrappers():
    md = (
        "text\n```bash\nray job submit --address http://H:8265 -- \\\n"
        "    python encoding/encode --images '/d/*.tar' --out /e  # note\n```\n"
    )
    assert [_command(x, ["encoding/encode"]) for x in _code_lines(md)] == [
        ["encoding/encode", "--images", "/d/*.tar", "--out", "/e"]
    ]
