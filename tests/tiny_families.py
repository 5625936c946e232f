"""Tiny randomly initialised models of every family the papers use, built offline (no hub), for tests only.

    model, processor = build("internvl", out_dir)   # also saved: a folder vlm.load() reads like a hub model

Each is the family's real model and processor classes with a tiny config (2 layers, hidden 32-64, images of
32-64 px) and a small byte-level BPE tokenizer holding the family's special tokens, so the code paths that
differ between families (image tokens, pixel layouts, cross-attention, anyres tiles) run for real. The chat
templates follow each family's layout (image item, then text; the family's role markers and end-of-turn
token); the real checkpoints ship their own templates, which vlm.prompt() applies unchanged.
"""
import torch

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "internvl", "llava", "llava_next", "mllama"]

CORPUS = ["Please provide the bounding box coordinates of the region this sentence describes: the red circle.",
          "<think>Find it.</think><answer>{\"bbox_2d\": [12, 40, 48, 76]}</answer>",
          "How many red shapes are there? \\boxed{3} What colour is the small shape? red blue green",
          "user assistant USER: ASSISTANT: [INST] [/INST]"] * 4


def _template(user, image, end, assistant):
    """A chat template in one family's layout: `user` + image marker + text + `end`, then `assistant`."""
    return ("{% for message in messages %}" + user + "{% if message['content'] is string %}{{ message['content'] }}"
            "{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}" + image + "{% endif %}"
            "{% endfor %}{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
            "{% endfor %}{% endif %}" + end + "{% endfor %}{% if add_generation_prompt %}" + assistant + "{% endif %}")


def _tokenizer(special, eos, pad, extra=None, bos=None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS + [" ".join(map(str, range(1001)))] * 5, trainers.BpeTrainer(
        vocab_size=600, special_tokens=special, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=pad, bos_token=bos,
                                   padding_side="left", extra_special_tokens=extra or {})


def _qwen_tokenizer():
    qwen = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>"]
    return _tokenizer(qwen, "<|im_end|>", "<|endoftext|>", dict(
        image_token="<|image_pad|>", video_token="<|video_pad|>", vision_start_token="<|vision_start|>",
        vision_end_token="<|vision_end|>"))


QWEN_TEMPLATE = _template("<|im_start|>{{ message['role'] }}\n", "<|vision_start|><|image_pad|><|vision_end|>",
                          "<|im_end|>\n", "<|im_start|>assistant\n")


def _text(tok, **kw):
    ids = tok.convert_tokens_to_ids
    return dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=ids(tok.bos_token or tok.pad_token),
                eos_token_id=ids(tok.eos_token), pad_token_id=ids(tok.pad_token), **kw)


def build(family, out_dir, seed=0):
    """Build the tiny `family` model + processor, save both to out_dir, return (model, processor)."""
    import transformers as T
    torch.manual_seed(seed)
    if family == "qwen2_5_vl":  # the project's own tiny architecture, smaller
        import vlm
        return vlm.build_tiny(CORPUS, out_dir=out_dir, seed=seed, hidden=64, layers=2, vision_hidden=32,
                              vision_layers=1)
    if family in ("qwen2_vl", "qwen3_vl"):
        tok = _qwen_tokenizer()
        ids = tok.convert_tokens_to_ids
        ip = dict(patch_size=8 if family == "qwen2_vl" else 16, merge_size=2, temporal_patch_size=2,
                  size=dict(shortest_edge=16 * 16, longest_edge=64 * 64))
        tokens = dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                      vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
        if family == "qwen2_vl":
            processor = T.Qwen2VLProcessor(T.Qwen2VLImageProcessor(**ip), tok, T.Qwen2VLVideoProcessor(**ip),
                                           chat_template=QWEN_TEMPLATE)
            config = T.Qwen2VLConfig(text_config=_text(tok, rope_parameters=dict(
                rope_type="default", rope_theta=1e4, mrope_section=[2, 3, 3])), vision_config=dict(
                depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=8, spatial_merge_size=2,
                temporal_patch_size=2, mlp_ratio=2), **tokens)
            model = T.Qwen2VLForConditionalGeneration(config)
        else:
            processor = T.Qwen3VLProcessor(T.Qwen2VLImageProcessor(**ip), tok, T.Qwen3VLVideoProcessor(**ip),
                                           chat_template=QWEN_TEMPLATE)
            config = T.Qwen3VLConfig(text_config=_text(tok, head_dim=16, rope_parameters=dict(
                rope_type="default", rope_theta=1e4, mrope_section=[2, 3, 3], mrope_interleaved=True)),
                vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16,
                                   spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
                                   num_position_embeddings=16, deepstack_visual_indexes=[0]), **tokens)
            model = T.Qwen3VLForConditionalGeneration(config)
    elif family == "internvl":
        special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
        tok = _tokenizer(special, "<|im_end|>", "<|endoftext|>", dict(
            start_image_token="<img>", end_image_token="</img>", context_image_token="<IMG_CONTEXT>",
            video_token="<video>"))
        # 32-px tiles of 8-px patches: 16 patches, pixel-shuffled by 0.5 -> 4 tokens per tile
        ip = dict(size=dict(height=32, width=32), crop_to_patches=True, min_patches=1, max_patches=4)
        processor = T.InternVLProcessor(T.GotOcr2ImageProcessor(**ip), tok, T.InternVLVideoProcessor(
            size=dict(height=32, width=32)), image_seq_length=4, chat_template=_template(
            "<|im_start|>{{ message['role'] }}\n", "<IMG_CONTEXT>\n", "<|im_end|>\n", "<|im_start|>assistant\n"))
        config = T.InternVLConfig(
            vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                               image_size=[32, 32], patch_size=[8, 8]),
            text_config=dict(model_type="qwen2", **_text(tok)), image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
            downsample_ratio=0.5, vision_feature_layer=-1)
        model = T.InternVLForConditionalGeneration(config)
    elif family in ("llava", "llava_next"):
        special = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]
        tok = _tokenizer(special, "</s>", "<pad>", dict(image_token="<image>"), bos="<s>")
        vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, image_size=32, patch_size=8, projection_dim=32)
        common = dict(vision_config=vision, text_config=dict(model_type="llama", **_text(tok)),
                      image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                      vision_feature_select_strategy="default")
        size = dict(shortest_edge=32)
        if family == "llava":  # LLaVA-1.5: one 32-px image -> 4 x 4 patch tokens (CLS dropped)
            template = _template("{% if message['role'] == 'user' %}USER: {% endif %}", "<image>\n", " ",
                                 "ASSISTANT:")
            processor = T.LlavaProcessor(T.CLIPImageProcessor(size=size, crop_size=dict(height=32, width=32)), tok,
                                         patch_size=8, vision_feature_select_strategy="default",
                                         num_additional_image_tokens=1, chat_template=template)
            model = T.LlavaForConditionalGeneration(T.LlavaConfig(**common))
        else:  # LLaVA-NeXT (1.6): anyres, a 32-px base view + tiles of the best grid, newline tokens per row
            pins = [[32, 64], [64, 32], [64, 64]]
            template = _template("[INST] ", "<image>\n", " [/INST]", "")
            processor = T.LlavaNextProcessor(T.LlavaNextImageProcessor(
                size=size, crop_size=dict(height=32, width=32), image_grid_pinpoints=pins), tok, patch_size=8,
                vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=template)
            model = T.LlavaNextForConditionalGeneration(T.LlavaNextConfig(image_grid_pinpoints=pins, **common))
    elif family == "mllama":
        special = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|finetune_right_pad_id|>",
                   "<|python_tag|>", "<|image|>"]
        tok = _tokenizer(special[:-1], "<|eot_id|>", "<|finetune_right_pad_id|>", bos="<|begin_of_text|>")
        tok.add_special_tokens({"additional_special_tokens": ["<|image|>"]})  # last id: outside the LM head, as in Llama-3.2
        template = "<|begin_of_text|>" + _template(
            "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n", "<|image|>", "<|eot_id|>",
            "<|start_header_id|>assistant<|end_header_id|>\n\n")
        processor = T.MllamaProcessor(T.MllamaImageProcessor(size=dict(height=32, width=32), max_image_tiles=2), tok,
                                      chat_template=template)
        text = _text(tok, cross_attention_layers=[1], rope_parameters=dict(rope_type="default", rope_theta=5e5))
        text["vocab_size"] = len(tok) - 1  # the LM head does not cover <|image|> (Llama-3.2-Vision's layout)
        config = T.MllamaConfig(
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
                               attention_heads=2, image_size=32, patch_size=8, max_num_tiles=2,
                               intermediate_layers_indices=[0], vision_output_dim=64,
                               supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]]),
            text_config=text, image_token_index=tok.convert_tokens_to_ids("<|image|>"))
        model = T.MllamaForConditionalGeneration(config)
        with torch.no_grad():  # the cross-attention gates start at 0 (the image has no effect); a trained model's do not
            for name, p in model.named_parameters():
                if "gate" in name:
                    p.fill_(1.0)
    else:
        raise ValueError(f"no tiny build for family {family!r}; known: {FAMILIES}")
    eos, pad = tok.convert_tokens_to_ids(tok.eos_token), tok.convert_tokens_to_ids(tok.pad_token)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = eos, pad
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return model, processor
