"""Encode benchmarks: bytes per sample, loader throughput, T5 length-sorted vs fixed-300 batches.

1. Bytes per sample: our valid-token fp16 safetensors members vs PixArt's layout (one
   `np.savez_compressed` per caption with `caption_feature` [1, 300, 4096] fp16 + `attention_mask`,
   plus the VAE mean/std `.npy`), for 4096-d features (t5-v1_1-xxl width) at a 1024² bucket.
   Feature values are random normal fp16 (T5 outputs are dense fp16 too; padding rows of a real
   encoder are not zeros, so they do not compress away either).
2. Loader samples/s, 2 DataLoader workers: our bucketed tars (`shards.loader`) vs the same samples
   stored one padded `.npz` (+ one `.npy`) per sample, read by a map-style Dataset.
3. T5 encode samples/s with batches padded to their longest caption after sorting by length vs
   every batch padded to 300 (PixArt's extractor), on a small random T5 on CPU.

Usage: python -m benchmarks.encode [--quick]   (writes benchmarks/results/encode.md)
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from shards import encoded, loader

HERE = Path(__file__).resolve().parent
C, L = 4096, 300


def lengths(n: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Token counts (with </s>): 'recaption' ~ Share-Captioner (170-220 tokens), 'original' ~ alt text."""
    if kind == "recaption":
        return np.clip(rng.normal(195, 30, n), 40, L).astype(int)
    if kind == "original":
        return np.clip(rng.lognormal(np.log(18), 0.6, n), 3, L).astype(int)
    return np.full(n, int(kind))


def padded_npz(n_tokens: int, rng) -> bytes:
    feat = rng.standard_normal((1, L, C)).astype(np.float16)  # padding rows are encoder outputs too
    mask = np.zeros((1, L), np.int64)
    mask[0, :n_tokens] = 1
    buf = io.BytesIO()
    np.savez_compressed(buf, caption_feature=feat, attention_mask=mask)
    return buf.getvalue()


def vae_npy(h: int, w: int, rng) -> bytes:
    buf = io.BytesIO()
    np.save(buf, rng.standard_normal((8, h // 8, w // 8)).astype(np.float16))
    return buf.getvalue()


def ours(n_re: int, n_orig: int, h: int, w: int, rng) -> tuple[int, int]:
    feats = {"recaption": torch.from_numpy(rng.standard_normal((n_re, C)).astype(np.float16))}
    if n_orig:
        feats["original"] = torch.from_numpy(rng.standard_normal((n_orig, C)).astype(np.float16))
    lat = torch.from_numpy(rng.standard_normal((4, h // 8, w // 8)).astype(np.float16))
    return len(encoded.pack_t5(feats)) + 3 * 512, len(encoded.pack_vae(lat, lat, 0.13025))  # + tar headers


def bench_bytes(n: int) -> list[str]:
    rng = np.random.default_rng(0)
    rows = [
        "| captions (tokens incl. `</s>`) | ours: T5 | PixArt npz: T5 | ratio T5 "
        "| ours: sample | PixArt: sample | ratio sample |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, re_kind, orig_kind in [
        ("both ~100", "100", "100"),
        ("recaption ~195 ± 30, original ~18", "recaption", "original"),
        ("recaption only, 100", "100", None),
    ]:
        re_len, orig_len = lengths(n, re_kind, rng), (lengths(n, orig_kind, rng) if orig_kind else np.zeros(n, int))
        o_t5, o_all, p_t5, p_all = [], [], [], []
        for a, b in zip(re_len, orig_len):
            t5b, vaeb = ours(a, b, 1024, 1024, rng)
            o_t5.append(t5b)
            o_all.append(t5b + vaeb + 512)
            pt5 = len(padded_npz(a, rng)) + (len(padded_npz(b, rng)) if b else 0)
            p_t5.append(pt5)
            p_all.append(pt5 + len(vae_npy(1024, 1024, rng)))
        mib = lambda v: f"{np.mean(v) / 2**20:.2f} MiB"
        rows.append(
            f"| {label} | {mib(o_t5)} | {mib(p_t5)} | {np.mean(o_t5) / np.mean(p_t5):.2f}x | {mib(o_all)} | "
            f"{mib(p_all)} | {np.mean(o_all) / np.mean(p_all):.2f}x |"
        )
    return rows


class NpzDataset(torch.utils.data.Dataset):
    """PixArt-style reading: one padded caption .npz + one VAE .npy per sample, sample and scale the latent."""

    def __init__(self, folder: Path, n: int):
        self.folder, self.n = folder, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        z = np.load(self.folder / f"{i:06d}.npz")
        y = torch.from_numpy(z["caption_feature"][0].astype(np.float32))  # [300, C]
        mask = torch.from_numpy(z["attention_mask"][0].astype(bool))  # [300]
        moments = torch.from_numpy(np.load(self.folder / f"{i:06d}.npy").astype(np.float32))  # [8, h, w]
        mean, std = moments[:4], moments[4:]
        return {"latent": (mean + std * torch.randn_like(std)) * 0.13025, "y": y, "mask": mask}


def bench_loader(n: int, hw: int) -> tuple[list[str], int, int]:
    rng = np.random.default_rng(1)
    re_len = lengths(n, "recaption", rng)
    with tempfile.TemporaryDirectory(dir=HERE.parent / ".cache" if (HERE.parent / ".cache").exists() else None) as tmp:
        tmp = Path(tmp)
        writer = encoded.BucketWriter(tmp / "enc", (hw, hw), "b" * 16, 32_000_000)  # ~10 tars: work for both workers
        for i in range(n):
            lat = torch.from_numpy(rng.standard_normal((4, hw // 8, hw // 8)).astype(np.float16))
            feats = {"recaption": torch.from_numpy(rng.standard_normal((re_len[i], C)).astype(np.float16))}
            meta = {"key": f"{i:06d}", "bucket": "1.0", "bucket_hw": [hw, hw], "captions": {"recaption": "x"}}
            writer.write(
                meta,
                encoded.pack_t5(feats),
                encoded.pack_vae(lat, lat.abs(), 0.13025),
                dict(key=meta["key"], status="kept", source="b"),
            )
            (tmp / "npz").mkdir(exist_ok=True)
            (tmp / "npz" / f"{i:06d}.npz").write_bytes(padded_npz(re_len[i], rng))
            (tmp / "npz" / f"{i:06d}.npy").write_bytes(vae_npy(hw, hw, rng))
        writer.close()
        encoded.write_info(tmp / "enc", dict(tier="bench", scaling_factor=0.13025, latent_channels=4))
        batch = 16
        ours_dl = loader.make_loader(tmp / "enc", batch_size=batch, num_workers=2, resample=False, shuffle_buffer=32)
        npz_dl = torch.utils.data.DataLoader(NpzDataset(tmp / "npz", n), batch_size=batch, num_workers=2, shuffle=True)
        rates: dict[str, list[float]] = {"ours": [], "npz": []}
        for _ in range(3):  # alternate, so load from other jobs hits both alike
            for name, dl in (("ours", ours_dl), ("npz", npz_dl)):
                t0, seen = time.perf_counter(), 0
                for b in dl:
                    seen += len(b["latent"])
                rates[name].append(seen / (time.perf_counter() - t0))
    fmt = lambda v: f"{max(v):.0f} ({' / '.join(f'{x:.0f}' for x in v)})"
    speedups = [a / b for a, b in zip(rates["ours"], rates["npz"])]
    return (
        [
            "| layout | samples/s, best (each of 3 alternating passes) |",
            "| --- | ---: |",
            f"| bucketed tars, valid-token safetensors (`shards.loader`) | {fmt(rates['ours'])} |",
            f"| one padded `.npz` + `.npy` per sample | {fmt(rates['npz'])} |",
            f"| speed-up | {max(rates['ours']) / max(rates['npz']):.1f}x best vs best "
            f"({' / '.join(f'{x:.1f}x' for x in speedups)} per round) |",
        ],
        n,
        hw,
    )


def bench_t5(n: int) -> tuple[list[str], float]:
    from transformers import T5Config, T5EncoderModel

    from encoders import t5

    tmp = Path(tempfile.mkdtemp())
    t5.build_tiny(tmp / "tok")
    tok = t5.load_tokenizer(tmp / "tok")
    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=len(tok), d_model=256, d_kv=32, d_ff=1024, num_layers=4, num_heads=8, feed_forward_proj="gated-gelu"
    )
    enc = T5EncoderModel(cfg).eval()
    rng = np.random.default_rng(2)
    words = "a red fox in the snow small wooden house near lake sunset mountain".split()
    caps = [
        " ".join(rng.choice(words, k))
        for k in np.concatenate(
            [lengths(n // 2, "recaption", rng) // 1.3, lengths(n - n // 2, "original", rng)]
        ).astype(int)
    ]
    rng.shuffle(caps)  # a Ray batch mixes both kinds of caption
    rows = ["| batching | samples/s (best of 3) | mean padded length |", "| --- | ---: | ---: |"]
    torch.set_num_threads(2)
    actor_batch, sub = 64, 32  # as T5Stage: sort within one Ray batch, encode in sub-batches
    t5.encode_captions(tok, enc, caps[:8], 300, batch_size=8)  # warm-up
    rates: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(3):  # alternate, so load from other jobs hits both alike
        for sort in (True, False):
            t0, lens = time.perf_counter(), []
            for start in range(0, n, actor_batch):
                lens += t5.encode_captions(
                    tok, enc, caps[start : start + actor_batch], 300, sort_by_length=sort, batch_size=sub
                )[1]
            rates[sort].append(n / (time.perf_counter() - t0))
    padded = np.mean(
        [
            max(sorted(lens[s : s + actor_batch])[i : i + sub])
            for s in range(0, n, actor_batch)
            for i in range(0, min(actor_batch, n - s), sub)
        ]
    )
    rows.append(
        f"| length-sorted within each batch of {actor_batch}, padded to sub-batch max "
        f"| {max(rates[True]):.1f} | {padded:.0f} |"
    )
    rows.append(f"| fixed 300 (PixArt) | {max(rates[False]):.1f} | 300 |")
    return rows, float(np.mean(lens))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    args = ap.parse_args()
    n_bytes, n_loader, n_t5 = (8, 32, 64) if args.quick else (40, 192, 192)
    bytes_rows = bench_bytes(n_bytes)
    loader_rows, n, hw = bench_loader(n_loader, 256)
    t5_rows, mean_len = bench_t5(n_t5)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, CPU"
    text = "\n".join(
        [
            "## Encode (`python -m benchmarks.encode`)",
            "",
            f"Machine: {machine}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end. Measured "
            f"{time.strftime('%Y-%m-%d')}.",
            "",
            f"### Bytes per sample (T5 width {C}, 1024² bucket, {n_bytes} samples per row)",
            "",
            "Ours: `KEY.t5.safetensors` (valid tokens, fp16) + `KEY.vae.safetensors` (mean + std fp16) "
            "+ tar headers (the ~0.4 kB json is not counted). "
            "PixArt: one `savez_compressed` per caption (`caption_feature` [1, 300, 4096] fp16 + mask) "
            "+ an 8-channel fp16 `.npy`. "
            "Target: ≤ 0.5x for ~100-token captions.",
            "",
            *bytes_rows,
            "",
            f"### Loader throughput ({n} samples at {hw}², recaption ~195 tokens at width {C})",
            "",
            "2 DataLoader workers, batch 16. Both read from the page cache (files just written), "
            "decode, sample the latent and pad `y` to 300 in float32; "
            "one pass over all samples per measurement. Target ≥ 3x.",
            "",
            *loader_rows,
            "",
            f"### T5 encode, length-sorted vs fixed-300 ({n_t5} captions, half Share-Captioner-like, "
            f"half alt-text-like, mean {mean_len:.0f} tokens; random T5 d_model 256, 4 layers, on CPU)",
            "",
            *t5_rows,
            "",
        ]
    )
    out = HERE / "results" / "encode.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
