"""cedar's tests, one folder per package (common, clients, server, strategies, benchmarks); the end-to-end
and deployment tests at the top."""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent  # the repository root (the Flower app's folder)
