"""`curation/convert_nsfw_head`: a Keras NSFW head in LAION's layers -> the file the curation workers load.

The slow test builds (once) a TensorFlow venv in the user cache, saves a random Keras model with
LAION's layers there (tests/curation/keras_nsfw_head.py), runs the real command in that venv, and
checks the converted head, loaded the way SafetyScorer loads it, against Keras' own outputs.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from encoders import safety
from tests import venvs

ROOT = Path(__file__).resolve().parents[2]
COMMAND = ROOT / "curation" / "convert_nsfw_head"
QUIET = venvs.TF_QUIET


@pytest.fixture(scope="module")
def tf_python() -> Path:
    """The TensorFlow venv's python (built from the session's start: tests/venvs.py); a failed install fails
    the test (CI has the package index)."""
    try:
        venvs.wait("tf")
        return venvs.build_tf()
    except RuntimeError as e:
        pytest.fail(str(e))


def convert(python, keras_dir, out) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(python), str(COMMAND), str(keras_dir), str(out)],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, **QUIET},
    )


@pytest.mark.slow
def test_converted_head_matches_keras(tf_python, tmp_path):
    subprocess.run(
        [str(tf_python), str(ROOT / "tests" / "curation" / "keras_nsfw_head.py"), str(tmp_path)],
        check=True,
        env={**os.environ, **QUIET},
    )
    out = tmp_path / "nsfw_head.safetensors"

    done = convert(tf_python, tmp_path / "keras_head", out)

    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert len(done.stdout.splitlines()) == 1 and "category columns: 7 (" in done.stdout
    emb, keras_out = np.load(tmp_path / "embeddings.npy"), np.load(tmp_path / "punsafe.npy")  # [300, 768], [300]
    scorer = safety.SafetyScorer(nsfw_head=str(out), watermark=None, device="cpu")
    punsafe = scorer({"clip_embedding": emb})["nsfw"]
    assert np.abs(punsafe - keras_out).max() <= 1e-5
    scorer.nsfw.lookup.columns = scorer.nsfw.lookup.columns[:0]
    assert np.abs(scorer({"clip_embedding": emb})["nsfw"] - keras_out).max() > 1e-3  # the categories count

    wrong = convert(tf_python, tmp_path / "wrong", tmp_path / "wrong.safetensors")
    assert wrong.returncode == 2 and wrong.stdout == "" and len(wrong.stderr.splitlines()) == 1
    assert "wrong: expected a Normalization" in wrong.stderr and "kernel [768, 32]" in wrong.stderr


def test_a_folder_that_is_not_a_savedmodel_is_one_line(tmp_path):
    (tmp_path / "keras").mkdir()
    (tmp_path / "keras" / "model.h5").write_bytes(b"x")

    done = convert(sys.executable, tmp_path / "keras", tmp_path / "out.safetensors")

    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        (
            f"error: {tmp_path / 'keras'}: not a TensorFlow SavedModel folder "
            "(no saved_model.pb, variables/variables.index); "
            "expected LAION's unzipped clip_autokeras_binary_nsfw/"
        )
    ]
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is not None, reason="this environment has TensorFlow")
def test_without_tensorflow_it_says_how_to_get_it(tmp_path):
    (tmp_path / "variables").mkdir()
    (tmp_path / "saved_model.pb").write_bytes(b"")
    (tmp_path / "variables" / "variables.index").write_bytes(b"")

    done = convert(sys.executable, tmp_path, tmp_path / "out.safetensors")

    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1
    assert "tensorflow is not installed here" in done.stderr and "pip install tensorflow-cpu==2.21.0" in done.stderr
