"""The DiT, its diffusion process, checkpoints, sampling and export (see model.py, diffusion.py, convert.py)."""
