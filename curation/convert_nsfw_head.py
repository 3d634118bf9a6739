"""LAION's Keras NSFW head (a TensorFlow SavedModel folder) -> the safetensors file `models.nsfw_head` reads.

LAION's `clip_autokeras_binary_nsfw/` was saved by autokeras 1.0 on Keras 2.8, which current
TensorFlow no longer loads as a Keras model. So nothing here deserialises Keras: the numbers are
read with TensorFlow alone, in its own environment (see curation/README.md), from
- the variables checkpoint: one Normalization (`mean`, `variance`; `count` unused) and four Dense
  layers (`kernel`, `bias`), ordered by their place in the model (`layer_with_weights-N` in
  LAION's file, `_operations/N` in one Keras 3 saves), 768 -> 64 -> 512 -> 256 -> 1;
- the object graph (`tf.saved_model.load`): autokeras' `MultiCategoryEncoding` read 5 of LAION's
  768 columns (180, 316, 413, 440, 644) as categories, each with a `lookup_table` from the value's
  `%f` text to an index (unseen: 0). Those tables live in saved_model.pb, not in the checkpoint.
The Dense kernels are stored transposed ([in, out] in Keras, [out, in] in torch). This module
imports only the standard library and shards/ at the top, so the main environment imports it too.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import sys
from pathlib import Path

from shards.atomic import atomic_path
from shards.errors import SigmaError

WIDTHS = [768, 64, 512, 256, 1]  # LAION's ViT-L/14 head: embedding -> 64 -> 512 -> 256 -> punsafe
TF_PACKAGES = ["tensorflow-cpu==2.21.0", "safetensors", "numpy"]  # never a dependency of the project
TF_ENV = f"python -m venv /tmp/tf && /tmp/tf/bin/pip install {' '.join(TF_PACKAGES)}"
VARIABLE = re.compile(r"(?P<layer>.+)/(?P<attr>[^/]+)/\.ATTRIBUTES/VARIABLE_VALUE")
NAMES = {
    "kernel": "kernel",
    "_kernel": "kernel",
    "bias": "bias",  # Keras 2 / Keras 3 attribute names
    "mean": "mean",
    "adapt_mean": "mean",
    "variance": "variance",
    "adapt_variance": "variance",
    "count": "count",
}
NOT_LAYERS = ("keras_api/", "optimizer/", "save_counter")  # metrics, optimizer state


def check_folder(folder: Path) -> None:
    """A SavedModel folder has saved_model.pb and variables/variables.index (checked before TF loads)."""
    missing = [n for n in ("saved_model.pb", "variables/variables.index") if not (folder / n).is_file()]
    if missing:
        raise SigmaError(
            f"{folder}: not a TensorFlow SavedModel folder (no {', '.join(missing)}); "
            "expected LAION's unzipped clip_autokeras_binary_nsfw/"
        )


def _place(layer: str) -> list:
    """Sort key: the model's layer order (`layer_with_weights-10` after `-9`)."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", layer)]


def read_layers(shapes: dict[str, list], folder: Path) -> tuple[str, list[str]]:
    """From the checkpoint's {key: shape}: the Normalization's layer path and the 4 Dense layer paths, in order."""
    layers: dict[str, dict[str, list]] = {}
    for key, shape in shapes.items():
        m = VARIABLE.fullmatch(key)
        if m and ".OPTIMIZER_SLOT" not in key and not key.startswith(NOT_LAYERS):
            layers.setdefault(m["layer"], {})[NAMES.get(m["attr"], m["attr"])] = list(shape)
    order = sorted(layers, key=_place)
    found = "; ".join(f"{p}: " + ", ".join(f"{a} {s}" for a, s in layers[p].items()) for p in order)
    want = [{"mean": [768], "variance": [768]}] + [
        {"kernel": [a, b], "bias": [b]} for a, b in itertools.pairwise(WIDTHS)
    ]
    got = [{a: s for a, s in layers[p].items() if a != "count"} for p in order]
    if got != want:
        raise SigmaError(
            f"{folder}: expected a Normalization (mean, variance [768]) and 4 Dense layers "
            f"{' -> '.join(map(str, WIDTHS))}; found {found or 'no variables'}"
        )
    return order[0], order[1:]


def read_lookups(tf, model, folder: Path) -> list[tuple[int, list[int], list[int]]]:
    """(column, keys in millionths, index) for each `encoding_layers/<column>/lookup_table` in the object graph."""
    found, seen, todo = [], set(), [("", model)]
    while todo:
        path, obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        for name, child in obj._trackable_children().items():
            if name == "lookup_table":
                m = re.search(r"encoding_layers/(\d+)$", path)
                if not m:
                    raise SigmaError(f"{folder}: a lookup table outside autokeras' encoding layers: {path}")
                found.append((int(m[1]), child))
            else:
                todo.append((f"{path}/{name}" if path else name, child))
    lookups = []
    for column, table in sorted(found, key=lambda t: t[0]):
        keys, index = tf.raw_ops.LookupTableExportV2(
            table_handle=table.resource_handle, Tkeys=tf.string, Tvalues=tf.int64
        )
        texts = [k.decode() for k in keys.numpy()]
        if not all(re.fullmatch(r"-?\d+\.\d{6}", t) for t in texts):
            raise SigmaError(f"{folder}: column {column}: lookup keys are not '%f' numbers: {texts[:3]}")
        micro = [int(t.replace(".", "")) for t in texts]  # '-0.123457' -> -123457, exact
        if len(set(micro)) != len(micro) or 0 in micro:  # '0.000000' and '-0.000000' would collide
            raise SigmaError(f"{folder}: column {column}: lookup keys collide in millionths")
        pairs = sorted(zip(micro, index.numpy().tolist()))
        lookups.append((column, [k for k, _ in pairs], [v for _, v in pairs]))
    return lookups


def convert(folder: str | Path, out: str | Path) -> str:
    """Write the safetensors state dict of NsfwHead (encoders/safety.py); returns what was found, one line."""
    folder, out = Path(folder), Path(out)
    if out.suffix != ".safetensors":
        raise SigmaError(f"{out}: the output must be a .safetensors file")
    check_folder(folder)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # one line of output, not TF's start-up log;
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # its oneDNN notice is printed before that level applies
    try:
        import numpy as np
        import tensorflow as tf
        from safetensors.numpy import save_file
    except ImportError as e:
        raise SigmaError(
            f"{e.name} is not installed here; this command runs in its own TensorFlow environment: "
            f"{TF_ENV}, then /tmp/tf/bin/python curation/convert_nsfw_head KERAS_DIR OUT.safetensors"
        ) from None
    reader = tf.train.load_checkpoint(str(folder / "variables" / "variables"))
    norm, dense = read_layers(reader.get_variable_to_shape_map(), folder)

    def value(layer: str, *attrs: str):
        keys = [f"{layer}/{a}/.ATTRIBUTES/VARIABLE_VALUE" for a in attrs]
        return np.ascontiguousarray(reader.get_tensor(next(k for k in keys if reader.has_tensor(k))), np.float32)

    state = {"norm.mean": value(norm, "mean", "adapt_mean"), "norm.variance": value(norm, "variance", "adapt_variance")}
    for i, layer in enumerate(dense, 1):
        state[f"linear_{i}.weight"] = np.ascontiguousarray(value(layer, "kernel", "_kernel").T)  # [out, in]
        state[f"linear_{i}.bias"] = value(layer, "bias")
    lookups = read_lookups(tf, tf.saved_model.load(str(folder)), folder)
    if lookups:
        state["lookup.columns"] = np.array([c for c, _, _ in lookups], np.int64)
        state["lookup.offsets"] = np.cumsum([0] + [len(k) for _, k, _ in lookups]).astype(np.int64)
        state["lookup.keys"] = np.array([k for _, keys, _ in lookups for k in keys], np.int64)
        state["lookup.index"] = np.array([v for _, _, index in lookups for v in index], np.float32)
    with atomic_path(out) as tmp:
        save_file(state, str(tmp))
    columns = ", ".join(f"{c} ({len(k)} values)" for c, k, _ in lookups) or "none"
    return f"{out}: Normalization + Dense {' -> '.join(map(str, WIDTHS))} from {folder}; category columns: {columns}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="curation/convert_nsfw_head",
        description=__doc__.splitlines()[0],
        epilog=f"example (in the TensorFlow environment: {TF_ENV}):\n"
        "  /tmp/tf/bin/python curation/convert_nsfw_head clip_autokeras_binary_nsfw/ nsfw_head.safetensors",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("keras_dir", help="LAION's unzipped clip_autokeras_binary_nsfw/ (saved_model.pb + variables/)")
    p.add_argument("out", help="the .safetensors file to write (models.nsfw_head)")
    args = p.parse_args(argv)
    try:
        print(convert(args.keras_dir, args.out))
    except SigmaError as e:  # common.cli.fail's one line; common/ is not importable in the TensorFlow env
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
