"""Frozen models every stage loads: T5, the SDXL VAE, CLIP with its aesthetic / NSFW / watermark heads.

Each loader takes a path or hub id and sits beside the builder of its tiny offline stand-in.
"""
