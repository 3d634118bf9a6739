"""Per-image scores: CLIP-Score, LAION aesthetic, and the reward models configured.

CLIP-Score: 100 * cos(image, text) with the configured open_clip model, the definition of
torchmetrics' `CLIPScore` (Hessel et al. 2021, w = 100) without its clamp at 0: real CLIP models
give an image and its prompt ~0.2-0.35, never near 0, while a random tiny model gives small
negative values that the clamp would flatten. Aesthetic: curation's scorer (CLIP embedding + LAION
MLP head), reused as is. Rewards: encoders/reward.py (HPSv2, PickScore) when
`evaluation.rewards` names them.
"""

from __future__ import annotations

from pathlib import Path

import torch

SCORE_COLUMNS = ("clip_score", "aesthetic")
REWARD_COLUMNS = ("hps", "pickscore")


def score_columns(df) -> list[str]:
    """The score columns a scores table has: CLIP and aesthetic, and the reward models scored."""
    return [c for c in SCORE_COLUMNS + REWARD_COLUMNS if c in df.columns]


class Scorer:
    """CLIP score and aesthetic score of (image, prompt) batches; one CLIP image pass feeds both.

    The image side is curation's `AestheticScorer` unchanged (its preprocessing, L2-normalised
    embedding and LAION head); the text side is the same open_clip model's text tower.
    `__call__({"image": [PIL], "prompt": [str]}) -> {"clip_score": [N], "aesthetic": [N], ...}`.
    """

    def __init__(
        self,
        clip_arch: str,
        clip_weights: str,
        clip_config_dir: str | None,
        aesthetic_head: str,
        device="cpu",
        rewards: dict | None = None,
    ):
        import open_clip

        from encoders import aesthetic

        self.aesthetic = aesthetic.AestheticScorer(clip_arch, clip_weights, clip_config_dir, aesthetic_head, device)
        self.tokenizer = open_clip.get_tokenizer(clip_arch)  # its config was registered by load_clip
        self.rewards = rewards or {}  # column -> encoders.reward scorer

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        scored = self.aesthetic({"image": list(batch["image"])})
        img = torch.from_numpy(scored["clip_embedding"])  # [N, E], L2-normalised
        clip, device = self.aesthetic.clip, self.aesthetic.device
        txt = clip.encode_text(self.tokenizer(list(batch["prompt"])).to(device)).float().cpu()  # [N, E]
        txt = txt / txt.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        clip_score = 100 * (img * txt).sum(-1)  # [N]
        rewards = {name: r(list(batch["image"]), list(batch["prompt"])) for name, r in self.rewards.items()}
        return {"clip_score": clip_score.numpy(), "aesthetic": scored["aesthetic"], **rewards}


def score_images(scorer, metas: list[dict], evaldir: Path, batch_size: int = 16, log=None):
    """One row per image (the sidecars `metas`, shards.evalset.read_sidecars): the table scores.parquet holds."""
    import pandas as pd
    from PIL import Image

    rows = []
    for start in range(0, len(metas), batch_size):
        chunk = metas[start : start + batch_size]
        images = []
        for m in chunk:
            with Image.open(m["png"]) as im:
                images.append(im.convert("RGB"))
        scores = scorer({"image": images, "prompt": [m["prompt"] for m in chunk]})
        for j, m in enumerate(chunk):
            rows.append(
                {
                    "run": m["run"],
                    "stage": m.get("stage"),
                    "prompt_idx": m["prompt_idx"],
                    "prompt": m["prompt"],
                    "category": m.get("category"),
                    "seed": m["seed"],
                    **{k: float(v[j]) for k, v in scores.items() if k in SCORE_COLUMNS + REWARD_COLUMNS},
                    "image": Path(m["png"]).relative_to(evaldir).as_posix(),
                }
            )
        if log:
            log(f"scored {min(start + batch_size, len(metas))}/{len(metas)} images")
    return pd.DataFrame(rows)
