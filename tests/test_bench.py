"""bench.py: its hand-written configs are the released ones and the shipped tiny one (checked by parameter count);
the memory table's arithmetic by hand for one row."""
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


@pytest.mark.parametrize("name, published", [("internvl3-8b", 7.94e9), ("llama-3.2-11b-vision", 10.67e9)])
def test_memory_table_models_match_published_parameter_counts(name, published):
    # OpenGVLab/InternVL3-8B-hf: 7.94B; meta-llama/Llama-3.2-11B-Vision: 10.67B (model cards)
    assert sum(p.numel() for p in bench.build_real(name).parameters()) == pytest.approx(published, rel=5e-3)


def test_memory_table_by_hand_for_the_7b_row():
    rows = {(r["model"], r["mode"]): r for r in bench.memory_rows(world=8) if r["script"] == "vicra"}
    N, GB = 8.29e9, 2 ** 30  # Qwen2.5-VL-7B
    ddp, fsdp, lora = (rows[("qwen2.5-vl-7b", m)] for m in ("DDP", "FSDP", "LoRA"))
    assert ddp["weights"] + ddp["grads"] + ddp["adamw"] == pytest.approx(16 * N / GB, rel=2e-3)  # 4 + 4 + 8 B
    assert fsdp["weights"] + fsdp["grads"] + fsdp["adamw"] == pytest.approx(16 * N / 8 / GB, rel=2e-3)
    assert fsdp["gathered"] == pytest.approx(2 * N / GB, rel=2e-3) and lora["ref"] == 0 == ddp["gathered"]
    # completion logits of one micro-batch: 4 x 2049 x 152064 x 16 B = 18.6 GiB of the activations
    assert ddp["activations"] > 4 * 2049 * 152064 * 16 / GB
    assert ddp["peak"] > 80 > fsdp["peak"] and lora["peak"] < 80  # 7B needs --fsdp or --lora_r on 80 GB
