"""CLIP-Score of each caption against its image, at encode: 100 * max(cos(image, text), 0).

The definition of torchmetrics' `clip_score` (Hessel et al. 2021, w = 100, clamped at 0), with the
CLIP model of `models.clip` (the one curation embeds images with). The image side is the embedding
curation already stored (CURDIR/dedup_index/*.parquet, `embedding`: L2-normalised fp16): a curated
image is not decoded again. An image without one (shards from elsewhere, or curated without the
CLIP pass) is embedded once from its bytes, at encode, and kept in its tar's row file
(`clip_embedding`), so sets added later are scored without reading images.

Captions longer than CLIP's 77-token context are truncated (open_clip's tokenizer keeps the start
token, the first 75 tokens and the end token), as torchmetrics and Sana's scores do: a long caption
is scored on its opening, which usually names the main subject, so long and short sets score
closer than their full texts would suggest; ENCDIR/caption_sets.json shows each set's
distribution side by side.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from shards import storage


class CaptionClipScore:
    """Holds the CLIP model; `image_embeddings(images)` and `scores(embeddings, texts)`."""

    def __init__(self, arch: str, weights: str, config_dir: str | None, device: str = "cpu"):
        from encoders import aesthetic

        self.device = torch.device(device)
        self.model, self.preprocess, self.tokenizer = aesthetic.load_clip(arch, weights, config_dir, self.device)
        self.size = aesthetic._image_size(self.model)

    @torch.no_grad()
    def image_embeddings(self, images: list[bytes]) -> list[np.ndarray | None]:
        """L2-normalised fp16 embeddings [E] of encoded images (None for bytes that do not decode)."""
        from encoders import aesthetic

        out: list[np.ndarray | None] = []
        for data in images:
            try:
                pixels = self.preprocess(aesthetic.open_rgb(data, self.size))[None].to(self.device)
            except (OSError, ValueError, SyntaxError):
                out.append(None)
                continue
            emb = self.model.encode_image(pixels).float()[0]  # [E]
            out.append((emb / emb.norm().clamp(min=1e-12)).cpu().numpy().astype(np.float16))
        return out

    @torch.no_grad()
    def scores(self, embeddings: list[np.ndarray], texts: list[str]) -> list[float]:
        """100 * max(cos, 0) of each (image embedding, caption) pair; captions truncated to 77 tokens."""
        if not texts:
            return []
        tokens = self.tokenizer(texts).to(self.device)  # [N, 77]
        txt = self.model.encode_text(tokens).float()  # [N, E]
        txt = txt / txt.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        img = torch.from_numpy(np.stack(embeddings).astype(np.float32)).to(self.device)  # [N, E]
        img = img / img.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        return (100 * (img * txt).sum(-1).clamp(min=0)).cpu().tolist()


def _loc(p: Any) -> storage.Loc:
    return p if isinstance(p, storage.Loc) else storage.resolve(p)


def curated_index(shards: list[Any]) -> list[tuple[str, str, str]]:
    """(file, smallest key, largest key) of each dedup index file of the curated folders the shards are in
    (CURDIR/shards/*.tar -> CURDIR/dedup_index/*.parquet, on disk or in a bucket), from parquet footers
    only; [] when none."""
    import pyarrow.parquet as pq

    out = []
    folders = {str(_loc(s).parent.parent): _loc(s).parent.parent for s in shards}
    for _, curdir in sorted(folders.items()):
        for f in (curdir / "dedup_index").glob("*.parquet"):
            with f.open("rb") as fh:
                meta = pq.ParquetFile(fh).metadata
            col = meta.schema.names.index("key")
            stats = [meta.row_group(i).column(col).statistics for i in range(meta.num_row_groups)]
            if stats and all(s is not None and s.has_min_max for s in stats):
                out.append((str(f), min(s.min for s in stats), max(s.max for s in stats)))
    return out


def lookup(index: list[tuple[str, str, str]], keys: list[str]) -> dict[str, bytes]:
    """{key: embedding bytes} for `keys` from the index files whose key range covers any of them."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if not keys or not index:
        return {}
    lo, hi, wanted = min(keys), max(keys), pa.array(sorted(set(keys)))
    out: dict[str, bytes] = {}
    for path, first, last in index:
        if last < lo or first > hi:
            continue
        with _loc(path).open("rb") as f:
            t = pq.read_table(f, columns=["key", "embedding"])
        t = t.filter(pc.is_in(t["key"], value_set=wanted))
        for k, e in zip(t["key"].to_pylist(), t["embedding"].to_pylist()):
            if e:
                out[k] = e
    return out
