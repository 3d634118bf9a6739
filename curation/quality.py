"""Technical quality, cheap and on CPU: sharpness, contrast, exposure of the small grey copy.

Measured on the <=512-px grey copy from metadata.inspect, so the numbers do not depend on the
resolution an image was served at. Sharpness is the variance of the 4-neighbour Laplacian
(blurred or upscaled images score low: a flat image 0, a sharp photo a few hundred);
contrast is the std of grey levels (near-uniform images score < 10); brightness the mean.
"""

from __future__ import annotations

import numpy as np

from shards import reasons


def metrics(grey) -> dict[str, float]:
    """{sharpness, contrast, brightness} of a mode-L PIL image."""
    g = np.asarray(grey, dtype=np.float32)  # [h, w]
    lap = g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:] - 4 * g[1:-1, 1:-1]  # [h-2, w-2]
    return {"sharpness": float(lap.var()), "contrast": float(g.std()), "brightness": float(g.mean())}


def verdict(
    m: dict[str, float], min_sharpness: float, min_contrast: float, min_brightness: float, max_brightness: float
) -> str | None:
    """`low_quality` when any metric is outside its threshold, else None."""
    ok = (
        m["sharpness"] >= min_sharpness
        and m["contrast"] >= min_contrast
        and min_brightness <= m["brightness"] <= max_brightness
    )
    return None if ok else reasons.LOW_QUALITY
