"""bench.py: its hand-written configs are the released ones and the shipped tiny one (checked by parameter count)."""
import math
import os

import pytest
from safetensors import safe_open

import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("scale, published", [("3b", 3.75e9), ("7b", 8.29e9)])
def test_real_scale_configs_match_published_parameter_counts(scale, published):
    # Qwen2.5-VL-3B-Instruct and -7B-Instruct model cards: 3.75B and 8.29B parameters
    model, _ = bench.build(scale, None, device="meta")  # shapes only, nothing allocated
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(published, rel=2e-3)


def test_tiny_scale_matches_the_shipped_checkpoint():
    with safe_open(os.path.join(ROOT, "checkpoints", "tiny-shapes", "model.safetensors"), "pt") as f:
        shipped = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    model, _ = bench.build("tiny", None, device="meta")
    assert sum(p.numel() for p in model.parameters()) == shipped == 3677920  # the tiny Qwen3-VL (issue 23)
