"""vlm.py: the tiny build round-trips, both prompt kinds run, box conventions invert, errors name the input."""
import json
import os
import shutil

import pytest
import torch
from PIL import Image

import vlm

CORPUS = ["Please provide the bounding box of the red circle. <think> </think> <answer> </answer>",
          '<think>Find the red circle.</think><answer>{"bbox_2d": [12, 40, 48, 76]}</answer>',
          "How many red shapes are there? \\boxed{3}", "user\n", "assistant\n"] * 5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    path = str(tmp_path_factory.mktemp("tiny"))
    model, processor = vlm.build_tiny(CORPUS, out_dir=path, seed=0)
    return model.eval(), processor, path


def image_inputs(processor, text, size=(100, 130)):
    img = Image.new("RGB", size, (200, 40, 40))
    return processor(text=[vlm.prompt(processor, text)], images=[img], return_tensors="pt")


def round_trip(tiny, box, model_type):
    """vlm.load of the saved tiny model: the family record, identical logits; returns the loaded processor."""
    model, processor, path = tiny
    loaded, processor2, fam = vlm.load(path)
    assert fam["box"] == box and fam["model_type"] == model_type
    inputs = image_inputs(processor2, "the red circle")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded.eval()(**inputs).logits)
    assert processor2.tokenizer.padding_side == "left"
    return processor2


def test_round_trip_gives_identical_logits(tiny):
    round_trip(tiny, "resized_px", "qwen2_5_vl")


def test_text_only_and_image_prompts_run_on_one_model(tiny):
    model, processor, _ = tiny
    with_img = image_inputs(processor, "How many red shapes are there?")
    text_only = processor(text=[vlm.prompt(processor, "How many red shapes are there?", image=False)],
                          return_tensors="pt")
    n_img = int((with_img["input_ids"] == model.config.image_token_id).sum())
    grid = with_img["image_grid_thw"][0]
    assert n_img == int(grid.prod()) // 4  # one token per 2x2 merged patch
    assert int((text_only["input_ids"] == model.config.image_token_id).sum()) == 0
    with torch.no_grad():
        la, lb = model(**with_img).logits, model(**text_only).logits
    assert torch.isfinite(la).all() and torch.isfinite(lb).all()
    # the last (generation) position must depend on whether the image was there
    assert not torch.allclose(la[0, -1], lb[0, -1])


def test_every_coordinate_value_is_one_token(tiny):
    _, processor, _ = tiny
    tok = processor.tokenizer
    for v in (0, 7, 42, 111, 255, 256):
        assert len(tok(str(v), add_special_tokens=False)["input_ids"]) == 1
        assert len(tok(f" {v}", add_special_tokens=False)["input_ids"]) == 1
    text = '<answer>{"bbox_2d": [12, 40, 148, 76]}</answer>'
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_resized_size_is_grid_times_patch(tiny):
    _, processor, _ = tiny
    inputs = image_inputs(processor, "x", size=(100, 130))
    w, h = vlm.resized_size(processor, inputs["image_grid_thw"][0])
    assert (w % 16, h % 16) == (0, 0)  # patch 8 x merge 2
    assert abs(w - 100) <= 16 and abs(h - 130) <= 16


def test_box_conventions_by_hand():
    qwen, intern = vlm.FAMILIES["qwen2_5_vl"], vlm.FAMILIES["internvl"]
    # 100x130 original seen as 112x128: x scales by 112/100, y by 128/130
    assert vlm.from_pixels([10, 20, 50, 65], qwen, (100, 130), (112, 128)) == [11, 20, 56, 64]
    assert vlm.to_pixels([112, 128, 56, 64], qwen, (100, 130), (112, 128)) == pytest.approx([100, 130, 50, 65])
    assert vlm.from_pixels([10, 20, 50, 65], intern, (100, 130)) == [100, 154, 500, 500]
    assert vlm.to_pixels([100, 154, 500, 500], intern, (100, 130)) == pytest.approx([10, 20.02, 50, 65])


def test_unknown_path_is_named():
    with pytest.raises(FileNotFoundError, match="no/such/model"):
        vlm.load("./no/such/model")


def test_not_an_image_text_to_text_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 8}))
    with pytest.raises(ValueError, match="not an image-text-to-text"):
        vlm.load(str(tmp_path))


def test_missing_processor_file(tiny, tmp_path):
    _, _, path = tiny
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    os.remove(copy / "processor_config.json")
    with pytest.raises(FileNotFoundError, match="processor"):
        vlm.load(str(copy))


def test_unknown_family_is_named():
    class Fake:
        class config:
            model_type = "blip"
    with pytest.raises(ValueError, match="blip"):
        vlm.family(Fake)


def test_tiny_mrope_section_is_used_and_checked():
    """build_tiny(mrope_section=...) must reach the decoder's rope: moving a token one column to the
    right (w + 1) changes exactly the w section, the last pairs of the head; bad sections name themselves."""
    with pytest.raises(ValueError, match=r"mrope_section \[2, 3, 10\]"):
        vlm.build_tiny(CORPUS, mrope_section=[2, 3, 10])  # head_dim 32 needs 16
    model, _ = vlm.build_tiny(CORPUS, mrope_section=[2, 3, 11])
    rope = model.model.language_model.rotary_emb
    pos = torch.full((3, 1, 1), 5)  # (t, h, w) x batch x sequence
    right = pos.clone()
    right[2] += 1
    cos, _ = rope(torch.zeros(1), pos)
    cos_right, _ = rope(torch.zeros(1), right)
    changed = ((cos - cos_right).abs()[0, 0, :16] > 1e-6).tolist()  # cos repeats its 16 pairs twice
    assert changed == [False] * 5 + [True] * 11


def test_tiny_rope_tells_visual_columns_apart(tiny):
    """Qwen2.5-VL's 3-D rope gives the w axis the lowest frequencies of the head. In the tiny model
    (7 visual columns at 112 px) they must turn by a radian or more from the first column to the last,
    or the decoder has no positional signal for x; with the usual theta 1e4 they turn by < 0.02 rad."""
    model, processor, _ = tiny
    text = model.config.text_config
    inv_freq = model.model.language_model.rotary_emb.inv_freq
    assert inv_freq.numel() == text.hidden_size // text.num_attention_heads // 2
    w_section = inv_freq[-text.rope_parameters["mrope_section"][2]:]  # sections are contiguous: t, h, w
    cols = 112 // (2 * model.config.vision_config.patch_size)
    assert (cols - 1) * w_section.min().item() > 1.0
    usual = 1e4 ** (-torch.arange(inv_freq.numel()) * 2 / (2 * inv_freq.numel()))
    assert (cols - 1) * usual[-len(w_section):].max().item() < 0.02


@pytest.fixture(scope="module")
def tiny_q3(tmp_path_factory):
    """The Qwen3-VL tiny at sft.py's default size."""
    torch.set_num_threads(1)
    path = str(tmp_path_factory.mktemp("tiny_q3"))
    model, processor = vlm.build_tiny(CORPUS, out_dir=path, seed=0, arch="qwen3_vl", hidden=192, layers=3)
    return model.eval(), processor, path


def test_tiny_qwen3_vl_round_trips_and_writes_norm1000(tiny_q3):
    model = tiny_q3[0]
    tok = round_trip(tiny_q3, "norm1000", "qwen3_vl").tokenizer
    for v in range(1001):  # every norm1000 value, with and without its leading space
        assert len(tok(str(v), add_special_tokens=False)["input_ids"]) == 1
        assert len(tok(f" {v}", add_special_tokens=False)["input_ids"]) == 1
    vc = model.config.vision_config
    assert vc.num_position_embeddings == (112 // 8) ** 2 and list(vc.deepstack_visual_indexes) == [0, 1]
    with pytest.raises(ValueError, match="arch"):
        vlm.build_tiny(CORPUS, arch="qwen3")


def test_tiny_qwen3_vl_rope_is_interleaved(tiny_q3):
    """Interleaved mrope: the w axis owns every third frequency pair (2, 5, 8, ...), so it gets high
    frequencies too, and at theta 1e4 the visual columns turn by radians (contrast the Qwen2.5-VL test above)."""
    model, _, _ = tiny_q3
    rope = model.model.language_model.rotary_emb
    pos = torch.full((3, 1, 1), 5)
    right = pos.clone()
    right[2] += 100  # far enough that even the lowest frequency (1.4e-4 rad per step) moves cos by > 1e-6
    cos, _ = rope(torch.zeros(1), pos)
    cos_right, _ = rope(torch.zeros(1), right)
    half = cos.shape[-1] // 2
    changed = ((cos - cos_right).abs()[0, 0, :half] > 1e-6).nonzero()[:, 0].tolist()
    assert changed == list(range(2, half, 3))
    inv_freq = rope.inv_freq
    cols = 112 // 16
    assert (cols - 1) * inv_freq[changed].max().item() > 1.0
