"""The two venvs some slow tests need (vLLM's CPU build, TensorFlow for the NSFW-head converter), built in
the background from the start of the session, and those tests moved to its end.

On a fresh machine (CI) each is minutes of `pip install`, mostly waiting on downloads and unpacking:
started when collection ends, the builds overlap the rest of the suite instead of adding to it. A build
that fails fails only the tests that need it (their fixtures re-raise its error). Nothing is started when
the venv is already built or no selected test needs it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from common.config import USER_CACHE

TF_VENV = USER_CACHE / "tf-venv"  # ~1.5 GB, reused by later runs while it imports
TF_QUIET = {"TF_CPP_MIN_LOG_LEVEL": "3", "TF_ENABLE_ONEDNN_OPTS": "0"}
_builds: dict[str, tuple[threading.Thread, list[BaseException]]] = {}


def tf_works(python: Path) -> bool:
    check = "import numpy, safetensors, tensorflow; assert tensorflow.__version__ == '2.21.0'"
    return (
        python.exists()
        and subprocess.run(
            [str(python), "-c", check], check=False, capture_output=True, env={**os.environ, **TF_QUIET}
        ).returncode
        == 0
    )


def build_tf() -> Path:
    """The TensorFlow venv's python (built if missing or broken); RuntimeError with pip's output if it fails."""
    from curation.convert_nsfw_head import TF_PACKAGES

    python = TF_VENV / "bin" / "python"
    if tf_works(python):
        return python
    shutil.rmtree(TF_VENV, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(TF_VENV)], check=True)
    pip = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", *TF_PACKAGES], check=False, capture_output=True, text=True
    )
    if pip.returncode or not tf_works(python):
        shutil.rmtree(TF_VENV, ignore_errors=True)
        raise RuntimeError(f"pip install {' '.join(TF_PACKAGES)} failed:\n{pip.stderr[-3000:]}")
    return python


def build_vllm() -> Path:
    from captioning import vllm_env

    with open(os.devnull, "w") as quiet:  # its progress lines would interleave with pytest's output
        return vllm_env.build("cpu", log=quiet)


def _vllm_ready() -> bool:
    from captioning import vllm_env

    return vllm_env.ready(vllm_env.DEFAULT_VENV, "cpu")


# test file -> (name, whether it is built already, the build)
NEEDS: dict[str, tuple[str, Callable[[], bool], Callable[[], Path]]] = {
    "test_vllm.py": ("vllm", _vllm_ready, build_vllm),
    "test_convert_nsfw_head.py": ("tf", lambda: tf_works(TF_VENV / "bin" / "python"), build_tf),
}


def start(items: list) -> None:
    """Move the tests that need a venv to the end, and start building the missing venvs now."""
    needing = [i for i in items if i.path.name in NEEDS]
    if not needing:
        return
    items[:] = [i for i in items if i.path.name not in NEEDS] + needing
    for file in dict.fromkeys(i.path.name for i in needing):
        name, ready, build = NEEDS[file]
        if name in _builds or ready():
            continue
        errors: list[BaseException] = []

        def run(build=build, errors=errors) -> None:
            try:
                build()
            except BaseException as e:  # noqa: BLE001 - handed to the waiting fixture, which fails its tests
                errors.append(e)

        thread = threading.Thread(target=run, name=f"build-{name}-venv", daemon=True)
        _builds[name] = (thread, errors)
        thread.start()


def wait(name: str) -> None:
    """Block until a background build of `name` ends; re-raise its error."""
    if name in _builds:
        thread, errors = _builds[name]
        thread.join()
        if errors:
            raise errors[0]
