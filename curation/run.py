#!/usr/bin/env python3
"""Entry point: python curation/run.py --urls URLS.parquet --out DIR [--config ...] [--profile ...] [--set k=v]."""
import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo root replaces this folder, whose modules must not shadow the stdlib

from curation.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
