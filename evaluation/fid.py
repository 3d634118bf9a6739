"""FID against a reference image set, through torchmetrics' `FrechetInceptionDistance`.

The Inception network is the library's own (`NoTrainInceptionV3`, torch-fidelity's
`FeatureExtractorInceptionV3`: the TF-ported 2015-12-05 Inception, resized to 299 with its TF1-style
bilinear interpolation), loaded from a local file in the format it reads (`torch.load` -> state dict;
torch-fidelity's release file `weights-inception-2015-12-05-6726825d.pth`), never downloaded. Only that
file (known by its sha256, whatever its name) gives FIDs comparable with published ones: any other is
labelled "not comparable" in metrics.json and on the page. `write_standin` writes a random-weight file
in that exact format for tests and the demo (its FIDs mean nothing, but every line of the real path runs).

Features are extracted once per image (the metric's own `inception`); the distance is the
library's `_compute_fid` on their mean and covariance (float64), exactly what
`FrechetInceptionDistance.compute` does, so a per-category FID and a bootstrap interval (resampling
the generated images) need no second pass over the pixels. Reference folders: any tree of images;
MJHQ-30K's `mjhq30k_imgs/<category>/<id>.jpg` gives each image its category (its folder).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from shards.errors import SigmaError

FEATURES = 2048  # pool3, the FID everyone reports; 64/192/768 are the library's smaller taps
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
REFERENCE_FILE = "weights-inception-2015-12-05-6726825d.pth"
# torch-fidelity's release file (the same 95,628,359 bytes as pytorch-fid's pt_inception-2015-12-05-6726825d.pth):
# the file name carries the first 8 hex digits of its sha256 (torch.hub's hash-prefix convention, which
# torch-fidelity's download URL follows); the full digest as pinned for that file by genforce's
# models/inception_model.py (`_MODEL_URL_SHA256['tf_inception_v3']`) and by others who check it.
REFERENCE_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
# FID is biased upward on small sets (the bias falls like 1/N: Chong & Forsyth, "Effectively Unbiased FID",
# CVPR 2020); published FIDs use 10k-50k images (MJHQ-30K: 30,000), so fewer is flagged as not comparable.
MIN_IMAGES = 10_000


def inception_file(path: str | Path) -> dict:
    """The `--inception` file checked before any model loads: {path, sha256, comparable (whether it is
    the reference weights, by content), note (why not)}; a one-line error when it is not a file."""
    p = Path(path)
    if not p.is_file():
        raise SigmaError(
            f"--inception {path}: file not found (torch-fidelity's {REFERENCE_FILE}, see evaluation/README.md)"
        )
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):  # ~0.2 s for the 96 MB file
            h.update(block)
    digest = h.hexdigest()
    comparable = digest == REFERENCE_SHA256
    note = None if comparable else f"not comparable: {p.name} is not {REFERENCE_FILE} (sha256 {digest[:12]}...)"
    return {"path": str(p), "sha256": digest, "comparable": comparable, "note": note}


class InceptionFeatures:
    """`__call__([PIL]) -> [N, features] float64`: the features FrechetInceptionDistance accumulates."""

    def __init__(self, weights: str | Path, features: int = FEATURES, device="cpu"):
        from torchmetrics.image.fid import FrechetInceptionDistance

        if not Path(weights).is_file():
            raise SigmaError(
                f"--inception {weights}: file not found (torch-fidelity's {REFERENCE_FILE}, see evaluation/README.md)"
            )
        try:
            self.metric = FrechetInceptionDistance(feature=features, feature_extractor_weights_path=str(weights))
        except (RuntimeError, KeyError, ValueError) as e:
            raise SigmaError(
                f"--inception {weights}: not torch-fidelity's InceptionV3 state dict ({str(e).splitlines()[0][:200]})"
            ) from None
        self.metric.to(device)
        self.device, self.features = device, features

    @torch.no_grad()
    def __call__(self, images, batch_size: int = 32) -> np.ndarray:
        """Runs of same-size images go through the network together (it resizes each to 299x299)."""
        arrays = [np.array(im.convert("RGB")) for im in images]  # [H, W, 3] uint8 each
        out, start = [], 0
        while start < len(arrays):
            end = start + 1
            while end < len(arrays) and end - start < batch_size and arrays[end].shape == arrays[start].shape:
                end += 1
            x = torch.from_numpy(np.stack(arrays[start:end])).permute(0, 3, 1, 2)  # [B, 3, H, W] uint8
            out.append(self.metric.inception(x.to(self.device)).double().cpu())  # [B, F]
            start = end
        return torch.cat(out).numpy() if out else np.zeros((0, self.features))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID of feature sets [N, F] and [M, F] (N, M >= 2), by the library's formula."""
    from torchmetrics.image.fid import _compute_fid

    if len(a) < 2 or len(b) < 2:
        return float("nan")
    ta, tb = torch.from_numpy(np.asarray(a, np.float64)), torch.from_numpy(np.asarray(b, np.float64))
    return float(_compute_fid(ta.mean(0), torch.cov(ta.T), tb.mean(0), torch.cov(tb.T)))


def fid_with_interval(
    fake: np.ndarray, real: np.ndarray, resamples: int = 0, level: float = 0.95, seed: int = 0
) -> dict:
    """FID of the generated set against the reference, and a percentile interval over bootstrap
    resamples of the generated images (duplicates in a resample raise FID a little: read the
    interval as the spread from the choice of prompts, not as a shift); `biased` when either set
    has fewer than MIN_IMAGES images."""
    point = frechet_distance(fake, real)
    lo = hi = float("nan")
    if resamples > 0 and len(fake) >= 2 and len(real) >= 2:
        rng = np.random.default_rng(seed)
        values = [frechet_distance(fake[rng.integers(0, len(fake), len(fake))], real) for _ in range(resamples)]
        lo, hi = (float(v) for v in np.percentile(values, [50 * (1 - level), 50 * (1 + level)]))
    biased = min(len(fake), len(real)) < MIN_IMAGES
    return {"fid": point, "lo": lo, "hi": hi, "n": len(fake), "n_reference": len(real), "biased": biased}


def reference_images(root: str | Path) -> list[tuple[Path, str | None]]:
    """Every image under `root`, with its category: the folder right below `root` (MJHQ-30K's
    layout), None for images directly in `root`."""
    root = Path(root)
    if not root.is_dir():
        raise SigmaError(f"--reference {root}: reference image folder not found")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(files) < 2:
        raise SigmaError(f"--reference {root}: needs at least 2 images (.png, .jpg, .webp), found {len(files)}")
    return [(p, p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else None) for p in files]


def reference_features(extract: InceptionFeatures, root: str | Path, cache: Path, log=print):
    """(features [N, F], categories [N]) of the reference set, cached in `cache` (an .npz keyed by
    the file list, sizes and the weights file): MJHQ-30K's 30k images are read once."""
    from PIL import Image

    from shards.atomic import write_bytes

    files = reference_images(root)
    key = hashlib.sha256(
        "|".join(f"{p.relative_to(root)}:{p.stat().st_size}" for p, _ in files).encode()
        + f"|{extract.features}".encode()
    ).hexdigest()[:16]
    if cache.exists():
        with np.load(cache, allow_pickle=False) as z:
            if str(z["key"]) == key:
                return z["features"], [c or None for c in z["categories"].tolist()]
    feats = []
    for start in range(0, len(files), 64):
        images = []
        for p, _ in files[start : start + 64]:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
        feats.append(extract(images))
        log(f"reference: {min(start + 64, len(files))}/{len(files)} images")
    features, categories = np.concatenate(feats), [c for _, c in files]
    import io

    buf = io.BytesIO()
    np.savez(buf, key=np.array(key), features=features, categories=np.array([c or "" for c in categories]))
    write_bytes(cache, buf.getvalue())
    return features, categories


def write_standin(path: str | Path, seed: int = 0) -> Path:
    """A random-weight InceptionV3 in torch-fidelity's file format (its state dict, `torch.save`),
    loadable by `InceptionFeatures`; convolutions He-initialised so features keep their scale."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Skeleton(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # the layers, without weights
            return None

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    empty = path.with_suffix(".empty")
    torch.save({}, empty)
    torch.manual_seed(seed)
    net = Skeleton("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    empty.unlink()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    tmp = path.with_suffix(".partial")
    torch.save(net.state_dict(), tmp)
    tmp.replace(path)
    return path
