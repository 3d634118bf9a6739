#!/usr/bin/env python3
"""Entry point: python curation/run.py --urls URLS.parquet --out DIR [--config ...] [--profile ...] [--set k=v]."""
import os
import sys

# The repository root replaces this folder on the path: its modules must not shadow the stdlib's.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from curation.cli import main  # noqa: E402 - after the path line above

if __name__ == "__main__":
    main()
