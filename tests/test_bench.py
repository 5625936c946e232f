"""bench.py: its hand-written real-scale configs are the released ones (checked by parameter count)."""
import pytest

import bench


@pytest.mark.parametrize("scale, published", [("3b", 3.75e9), ("7b", 8.29e9)])
def test_real_scale_configs_match_published_parameter_counts(scale, published):
    # Qwen2.5-VL-3B-Instruct and -7B-Instruct model cards: 3.75B and 8.29B parameters
    model, _ = bench.build(scale, None, device="meta")  # shapes only, nothing allocated
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(published, rel=2e-3)
