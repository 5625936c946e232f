"""Tests that run the scripts on their defaults need the shapes data, which is generated, not committed.
It is deterministic from its seed, so make it once (~20 s) when any default file is missing."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def pytest_sessionstart(session):
    files = [ROOT / "data" / "shapes" / f"{t}_{s}.jsonl"
             for t in ("grounding", "reasoning", "detail") for s in ("train", "val", "test")]
    if not all(f.exists() for f in files):
        subprocess.run([sys.executable, "data/shapes/prepare.py"], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
