"""
The one shared module: load a vision-language model, or build the tiny one.

    model, processor, fam = vlm.load("Qwen/Qwen2.5-VL-3B-Instruct", "cuda", torch.bfloat16)
    model, processor, fam = vlm.load("checkpoints/tiny-shapes")     # the embedded default

`fam` is a small per-family record: how the model writes boxes, and which
module outputs the projected visual embeddings (what the LLM sees; egg_ground.py
hooks it). `prompt()` builds a chat prompt with or without the image, and
`to_pixels()` / `from_pixels()` convert boxes between the model's convention and
pixels of the original image.

`build_tiny()` makes a tiny Qwen3-VL or Qwen2.5-VL (`arch=`) fully offline (the same classes as
the real models): a byte-level BPE tokenizer trained on a given corpus (so our
fixed prompts are a few tokens, not hundreds of characters) that holds every
coordinate value as one token, the Qwen special tokens, and a processor with a
chat template. Everything else in the project only ever calls `load()`.
"""
import os

import torch

# Per-family record: what the scripts need to know about a model family, and nothing else.
# box: the coordinate convention of the family's grounding outputs --
#   'resized_px' absolute pixels of the image *after* the processor's resize (Qwen2-VL, Qwen2.5-VL);
#   'norm1000'   integers 0..1000 of the image (InternVL, Qwen3-VL: their grounding data; Llama-3.2-Vision has no
#                native format: we chose norm1000 because its tokenizer writes 0..999 as one token);
#   'norm1'      floats 0..1 of the image (LLaVA-1.5 / LLaVA-NeXT: no native grounding format; their RefCOCO /
#                VG instruction data writes boxes as 0..1 floats with 2-3 decimals, so the model has that prior).
# visual: the module whose output is the projected visual embeddings (what the LLM sees; egg_ground.py hooks
#   it); a tensor, or a ModelOutput with `pooler_output` (Qwen).
# pixels: how `pixel_values` is laid out, i.e. how grpo.take() cuts a batch by row --
#   'flat' one tensor for the whole batch whose leading rows are Qwen's patches (prod(image_grid_thw) per image)
#          or InternVL's 448-px tiles (tiles + thumbnail per image); a row owns a share proportional to its
#          image-placeholder tokens (a fixed number per patch group / tile);
#   'rows' leading dim = the batch row (LLaVA: (N, C, H, W); LLaVA-NeXT: (N, tiles, C, H, W) + image_sizes;
#          Mllama: (N, images, tiles, C, H, W) + aspect_ratio_ids / _mask + cross_attention_mask).
# cross_attention: the image enters through cross-attention layers (Mllama), not placeholder tokens in the
#   sequence: one <|image|> token marks it, and `cross_attention_mask` says which text positions see it.
FAMILIES = {
    "qwen2_vl": dict(box="resized_px", visual="model.visual", pixels="flat"),
    "qwen2_5_vl": dict(box="resized_px", visual="model.visual", pixels="flat"),
    "qwen3_vl": dict(box="norm1000", visual="model.visual", pixels="flat"),
    "internvl": dict(box="norm1000", visual="model.multi_modal_projector", pixels="flat"),
    "llava": dict(box="norm1", visual="model.multi_modal_projector", pixels="rows"),
    "llava_next": dict(box="norm1", visual="model.multi_modal_projector", pixels="rows"),
    "mllama": dict(box="norm1000", visual="model.multi_modal_projector", pixels="rows", cross_attention=True),
}


def family(model):
    """The per-family record of a loaded model (raises, naming the type, if unknown), with the model's
    image-placeholder id (None where it is outside the LM head's vocabulary: Mllama's <|image|>)."""
    model = getattr(model, "module", model)  # DDP wraps the model
    t = model.config.model_type
    if t not in FAMILIES:
        raise ValueError(f"vlm.py knows no box convention / visual module for model_type '{t}'; "
                         f"supported: {sorted(FAMILIES)}. Add an entry to vlm.FAMILIES.")
    c = model.config
    image = getattr(c, "image_token_id", None) or getattr(c, "image_token_index", None)
    placeholders = [i for i in (image, getattr(c, "video_token_id", None))
                    if i is not None and i < c.get_text_config().vocab_size]
    return dict(FAMILIES[t], model_type=t, image_token_id=image, placeholders=placeholders)


def load(name_or_path, device="cpu", dtype=torch.float32):
    """(model, processor, fam) for any HF image-text-to-text model, by local path or hub id."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    looks_local = os.path.sep in name_or_path or name_or_path.startswith(".")
    if looks_local and not os.path.isdir(name_or_path):
        raise FileNotFoundError(f"model path '{name_or_path}' does not exist "
                                "(the tiny default is made by sft.py, see README)")
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except OSError as e:
        raise OSError(f"cannot load model '{name_or_path}': not a local checkpoint and not reachable "
                      f"on the hub (no network here?). {e}") from None
    if config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise ValueError(f"'{name_or_path}' is a '{config.model_type}' model, not an image-text-to-text "
                         "model (AutoModelForImageTextToText cannot load it)")
    if os.path.isdir(name_or_path) and not any(
            os.path.exists(os.path.join(name_or_path, f)) for f in ("processor_config.json", "preprocessor_config.json")):
        raise FileNotFoundError(f"'{name_or_path}' has no processor_config.json / preprocessor_config.json: "
                                "save the processor with the model (processor.save_pretrained)")
    processor = AutoProcessor.from_pretrained(name_or_path)
    model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=dtype).to(device)
    processor.tokenizer.padding_side = "left"  # generation appends on the right
    return model, processor, family(model)


def prompt(processor, text, image=True):
    """Chat prompt string for one user turn (image then text), ready for generation."""
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}],
                                         add_generation_prompt=True, tokenize=False)


NORM = {"norm1000": 1000, "norm1": 1}


def to_pixels(box, fam, orig_wh, resized_wh=None):
    """A box in the family's convention -> pixels of the original image (floats)."""
    (W, H), (x1, y1, x2, y2) = orig_wh, box
    if fam["box"] == "resized_px":
        # Qwen2.5-VL writes pixels of the resized image (grid_w*patch x grid_h*patch)
        sx, sy = W / resized_wh[0], H / resized_wh[1]
    elif fam["box"] in ("norm1000", "norm1"):
        sx, sy = (W / NORM[fam["box"]], H / NORM[fam["box"]])
    else:
        raise ValueError(f"unknown box convention {fam['box']}")
    return [x1 * sx, y1 * sy, x2 * sx, y2 * sy]


def from_pixels(box, fam, orig_wh, resized_wh=None):
    """Pixels of the original image -> the family's convention, rounded as the model writes it (ints; 'norm1':
    2 decimals)."""
    (W, H), (x1, y1, x2, y2) = orig_wh, box
    if fam["box"] == "resized_px":
        sx, sy = resized_wh[0] / W, resized_wh[1] / H
    elif fam["box"] in ("norm1000", "norm1"):
        sx, sy = NORM[fam["box"]] / W, NORM[fam["box"]] / H
    else:
        raise ValueError(f"unknown box convention {fam['box']}")
    digits = 2 if fam["box"] == "norm1" else None  # LLaVA's data writes 0..1 with 2 decimals
    return [round(v, digits) for v in (x1 * sx, y1 * sy, x2 * sx, y2 * sy)]


def resized_size(processor, image_grid_thw):
    """(w, h) in pixels of the image the model saw, from one row of image_grid_thw."""
    patch = processor.image_processor.patch_size
    _, gh, gw = (int(v) for v in image_grid_thw)
    return gw * patch, gh * patch


def seen_sizes(processor, fam, inputs):
    """Per row of a processed batch: (w, h) of the image the model saw where the box convention needs it
    ('resized_px': Qwen2/2.5-VL write pixels of the resized image), else None."""
    if fam["box"] != "resized_px":
        return [None] * len(inputs["input_ids"])
    return [resized_size(processor, thw) for thw in inputs["image_grid_thw"]]


def visual_module(model, fam):
    """The module whose output is the projected visual embeddings (for hooks)."""
    m = model
    for part in fam["visual"].split("."):
        m = getattr(m, part)
    return m


def vision_parameters(model):
    """The vision side's parameters: tower, projector and the like (LLaVA-NeXT's image_newline), i.e. all but the
    language model's and the output head's (the scripts' --vision_lr group). Every supported family keeps its LM at
    model.model.language_model. Mllama's cross-attention layers live in the LM, so they are not in this group."""
    lm = {id(p) for m in (model.model.language_model, model.get_output_embeddings()) for p in m.parameters()}
    return [p for p in model.parameters() if id(p) not in lm]


# ----------------------------------------------------------------------------
# The tiny Qwen2.5-VL, built offline
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
# The Qwen2-VL template, except the tiny model puts the text before the image:
# with causal attention the image tokens then see the query, which a 4-layer
# LM needs to learn referring expressions in CPU time (SPEC.md, third probe).
# Real models keep their own templates.
TINY_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_tiny(corpus, out_dir=None, seed=0, image_size=112, max_coord=None, vocab_size=None,
               hidden=128, layers=4, heads=4, vision_hidden=128, vision_layers=2, patch=8,
               rope_theta=None, mrope_section=None, arch="qwen2_5_vl"):
    """A tiny randomly initialised Qwen2.5-VL (arch="qwen2_5_vl") or Qwen3-VL (arch="qwen3_vl") + processor
    (saved to out_dir if given).

    corpus: strings the tokenizer's BPE merges are learnt from (prompts and answers).
    Every integer 0..max_coord is forced to be a single token, with and without a
    leading space: our probe found digits-as-characters do not learn boxes on a CPU.
    rope_theta is 3, not 1e4: Qwen2.5-VL's 3-D rope gives (t, h, w) contiguous slices of
    the head's frequencies theta^(-i/16) (head_dim 32), and w gets the lowest, i = 10..15.
    At theta 1e4 those turn by < 0.02 rad across the 7 visual columns of a 112-px image, so
    the decoder cannot tell columns apart; at theta 3 they turn by 2-3 rad.
    mrope_section (t, h, w) defaults to real Qwen2.5-VL's 1 : 1.5 : 1.5 split of head_dim / 2;
    notes/sft.md has probes with other splits (none shipped).

    arch="qwen3_vl" (notes/sft.md, "Sixth attempt"): the Qwen3-VL design, which binds the query to the
    image where Qwen2.5-VL did not: a learned absolute position embedding in the vision tower
    (num_position_embeddings = the patch grid of an image_size image, interpolated for larger ones),
    interleaved t/h/w rope (every axis gets low and high frequencies, so rope_theta stays 1e4, and the
    mrope_section is the real model's equal 1 : 1 : 1 split of head_dim / 2), and DeepStack: the
    vision tower's intermediate features re-added to the visual tokens after decoder layers 0 .. n-1.
    Its boxes are norm1000 (vlm.FAMILIES), so every integer 0..1000 is a single token (max_coord 1000).
    """
    qwen3 = arch == "qwen3_vl"
    if arch not in ("qwen2_5_vl", "qwen3_vl"):
        raise ValueError(f"build_tiny: unknown arch {arch!r} (qwen2_5_vl or qwen3_vl)")
    max_coord = max_coord if max_coord is not None else (1000 if qwen3 else 256)
    # room for the byte alphabet, 2 x (max_coord + 1) coordinate spellings and ~500 word merges
    vocab_size = vocab_size or (1024 if max_coord <= 256 else 2 * (max_coord + 1) + 1024)
    rope_theta = rope_theta if rope_theta is not None else (1e4 if qwen3 else 3.0)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                              Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor, Qwen3VLConfig,
                              Qwen3VLForConditionalGeneration, Qwen3VLProcessor, Qwen3VLVideoProcessor)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2 split: ' ?\d+' stays one piece
    tok.decoder = decoders.ByteLevel()
    numbers = [str(i) for i in range(max_coord + 1)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=QWEN_SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # numbers are repeated so that the trainer always merges them into single tokens
    tok.train_from_iterator(list(corpus) + [" ".join(numbers) + " " + ",".join(numbers)] * 50, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"})
    ids = tokenizer.convert_tokens_to_ids
    for n in numbers:  # one token per coordinate value, checked, not hoped for
        for text in (n, " " + n):
            assert len(tokenizer(text)["input_ids"]) == 1, f"coordinate {text!r} is not a single token"
    size = dict(shortest_edge=(patch * 2) ** 2 * 4, longest_edge=(image_size * 2) ** 2)
    image_processor = Qwen2VLImageProcessor(patch_size=patch, merge_size=2, temporal_patch_size=2, size=size)
    special = dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                   vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    text_cfg = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                    num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                    max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=ids("<|endoftext|>"),
                    eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"))
    head_dim = hidden // heads
    torch.manual_seed(seed)
    if qwen3:
        processor = Qwen3VLProcessor(
            image_processor=image_processor, tokenizer=tokenizer, chat_template=TINY_TEMPLATE,
            video_processor=Qwen3VLVideoProcessor(patch_size=patch, merge_size=2, temporal_patch_size=2, size=size))
        sections = list(mrope_section or [head_dim // 6] * 3)  # (t, h, w), interleaved
        if len(sections) != 3 or sum(sections) != head_dim // 2:
            raise ValueError(f"mrope_section {sections}: need 3 sections summing to head_dim / 2 = {head_dim // 2}")
        config = Qwen3VLConfig(
            text_config=dict(text_cfg, head_dim=head_dim, rope_parameters=dict(
                rope_type="default", rope_theta=rope_theta, mrope_section=sections, mrope_interleaved=True)),
            vision_config=dict(depth=vision_layers, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                               num_heads=heads, patch_size=patch, spatial_merge_size=2, temporal_patch_size=2,
                               out_hidden_size=hidden, num_position_embeddings=(image_size // patch) ** 2,
                               deepstack_visual_indexes=list(range(min(vision_layers, layers - 1)))),
            tie_word_embeddings=True, **special)
        model = Qwen3VLForConditionalGeneration(config)
    else:
        processor = Qwen2_5_VLProcessor(
            image_processor=image_processor, tokenizer=tokenizer, chat_template=TINY_TEMPLATE,
            video_processor=Qwen2VLVideoProcessor(patch_size=patch, merge_size=2, temporal_patch_size=2, size=size))
        sections = list(mrope_section or [head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16])  # (t, h, w)
        if len(sections) != 3 or sum(sections) != head_dim // 2:
            raise ValueError(f"mrope_section {sections}: need 3 sections summing to head_dim / 2 = {head_dim // 2}")
        config = Qwen2_5_VLConfig(
            text_config=dict(text_cfg, rope_parameters=dict(rope_type="default", rope_theta=rope_theta,
                                                        mrope_section=sections)),
            vision_config=dict(depth=vision_layers, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                               num_heads=heads, patch_size=patch, spatial_merge_size=2, temporal_patch_size=2,
                               out_hidden_size=hidden, window_size=image_size * 2,  # one window: all blocks see it all
                               fullatt_block_indexes=list(range(vision_layers))),
            tie_word_embeddings=True, **special)
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids("<|im_end|>")
    model.generation_config.pad_token_id = ids("<|endoftext|>")
    if out_dir:
        model.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
    return model, processor
