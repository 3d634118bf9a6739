"""Edges of the shell and the cluster, for every entry point: `| head` ends quietly, a command started by
a Python without the project's packages says how to get them in one line, the settings the stages need
reach a cluster's workers, and the README names the token-auth value."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from common import ray_start
from tests.test_documented_commands import entry_points

ROOT = Path(__file__).resolve().parent.parent
OTHER_ENV = ("curation/convert_nsfw_head",)  # runs in a TensorFlow environment by design (curation/README.md)


def closed_stdout(*argv: str) -> tuple[int, str]:
    """Run with stdout a pipe whose reader is gone (as `| head` leaves it); (status, stderr)."""
    p = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stderr is not None
    p.stdout.close()
    err = p.stderr.read().decode()
    return p.wait(timeout=120), err


@pytest.mark.parametrize(
    "argv",
    [
        ["evaluation/evaluate", "--help"],
        ["evaluation/evaluate", "nowhere", "--dry-run"],  # the plan printed as JSON
        # a write that fails mid-run (more than the pipe holds) through the hook entry points install
        ["-c", "from common import cli\ncli.quiet_broken_pipe()\nfor _ in range(20000): print('x' * 100)"],
    ],
)
def test_a_closed_pipe_ends_quietly(argv):
    code, err = closed_stdout(*argv)
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err, err
    assert code in (0, 1), err


def test_entry_points_check_the_interpreter_before_any_package():
    scripts = [s for s in entry_points() if s not in OTHER_ENV]
    assert len(scripts) >= 12
    for script in scripts:
        text = (ROOT / script).read_text()
        check = text.find("interpreter.check()")
        imports = re.finditer(r"^\s*(?:from|import) ([\w.]+)(?: import (\w+))?", text, re.M)
        first = next(
            m.start()
            for m in imports
            if m.group(1).split(".")[0] not in sys.stdlib_module_names and m.group(2) != "interpreter"
        )
        assert 0 < check < first, f"{script}: interpreter.check() is not its first step"


def test_a_python_without_the_packages_is_told_how_to_get_them():
    """-I -S: no site-packages, as the system python without the venv."""
    r = subprocess.run(
        [sys.executable, "-I", "-S", "captioning/recaption", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "make setup" in r.stderr and ". .venv/bin/activate" in r.stderr and "no module" in r.stderr


def test_the_stages_settings_reach_a_clusters_workers(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.delenv(ray_start.JOB_CONFIG, raising=False)
    env = ray_start.worker_env_vars()
    assert set(ray_start.WORKER_ENV) <= set(env) and env["HF_HUB_OFFLINE"] == "1"
    # a key the submitted job's runtime_env sets is the user's (and Ray refuses a repeated key)
    job = {"runtime_env": {"env_vars": {"TOKENIZERS_PARALLELISM": "true"}, "working_dir": "."}}
    monkeypatch.setenv(ray_start.JOB_CONFIG, json.dumps(job))
    assert "TOKENIZERS_PARALLELISM" not in ray_start.worker_env_vars()


def test_the_readme_names_the_token_auth_value_and_a_second_local_ray():
    readme = (ROOT / "README.md").read_text()
    assert "RAY_AUTH_MODE=token" in readme
    assert "--temp-dir" in readme and "Ctrl-C there stops that Ray and nothing else" in readme
