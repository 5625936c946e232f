"""Every model family the papers use runs every script (tiny random models of the real classes, built offline in
tests/tiny_families.py): load round trip, box conventions, row cutting of a batch (a row of a padded 2-image
batch scores exactly as the row alone), VICRA's no-image and VEPO's perturbed forwards really drop / change
the image, and two steps of grpo / ecvgpo / vicra / vepo change the weights."""
import json
import os
import runpy
import signal
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import grpo
import vlm
from tiny_families import FAMILIES, build

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = [(40, 30), (64, 48), (30, 52)]  # different sizes: different token / tile counts, so a batch is padded


def detail_rows(folder, n=4):
    """Detail rows (one-word answer 'red') on images of different sizes and questions of different lengths
    (so a batch is left-padded in every family, also where the image token count is fixed), as a jsonl split."""
    rows = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        Image.new("RGB", (w, h), [(220, 40, 40), (40, 80, 220), (40, 170, 60)][i % 3]).save(f"{folder}/{i}.png")
        question = "What colour is the small shape?" + " Look closely at the picture." * (i % 2)  # padding for all
        rows.append(dict(task="detail", image=f"{i}.png", question=question, answer="red",
                         box=[0, 0, w // 2, h // 2], width=w, height=h))
    with open(f"{folder}/detail.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return grpo.load_rows(f"{folder}/detail.jsonl")


def teach(model, processor, rows, steps=50):
    """A few teacher-forced steps so the first answer is 'red' or 'blue' about half the time each: a random
    model earns reward 0 everywhere (A = 0, nothing would move); this one earns 1 on about half its samples."""
    images = [grpo.load_image(r) for r in rows]
    prompt = grpo.encode(processor, rows, images, G=2)
    tok, eos = processor.tokenizer, model.generation_config.eos_token_id
    answers = [tok(a, add_special_tokens=False)["input_ids"] + [eos] for a in ("red", "blue")] * len(rows)
    T = max(map(len, answers))
    ids = torch.tensor([a + [eos] * (T - len(a)) for a in answers])
    mask = torch.tensor([[1] * len(a) + [0] * (T - len(a)) for a in answers])
    x = grpo.with_completion(prompt, ids, mask)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        lp = grpo.token_logprobs(model, x, ids, 1.0)[0]
        loss = -(lp * mask).sum() / mask.sum()
        loss.backward(), torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0), opt.step(), opt.zero_grad()
    return loss.item()


@pytest.fixture(scope="session")
def families(tmp_path_factory):
    """family -> (path of the taught model, its data folder, detail rows, the built-in-memory model)."""
    out = {}
    for f in FAMILIES:
        path, data = str(tmp_path_factory.mktemp(f)), str(tmp_path_factory.mktemp(f + "-data"))
        built, processor = build(f, path)
        model, processor, _ = vlm.load(path)
        rows = detail_rows(data)
        teach(model.train(), processor, rows)
        taught = str(tmp_path_factory.mktemp(f + "-taught"))
        model.save_pretrained(taught), processor.save_pretrained(taught)
        out[f] = dict(path=path, taught=taught, data=data, rows=rows, built=built.eval())
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_load_round_trip_and_family_record(families, family):
    f = families[family]
    model, processor, fam = vlm.load(f["path"])
    assert fam["model_type"] == family and fam["box"] in ("resized_px", "norm1000", "norm1")
    vocab = model.get_output_embeddings().weight.shape[0]
    if family == "mllama":  # <|image|> lies outside Llama-3.2-Vision's LM head: it cannot be sampled, nothing to mask
        assert fam["image_token_id"] >= vocab and fam["placeholders"] == []
    else:
        assert fam["image_token_id"] in fam["placeholders"] and all(i < vocab for i in fam["placeholders"])
    x = grpo.encode(processor, f["rows"][:2], [grpo.load_image(r) for r in f["rows"][:2]])
    with torch.no_grad():
        assert torch.equal(f["built"](**x).logits, model.eval()(**x).logits)
    assert vlm.visual_module(model, fam) is not None


@pytest.mark.parametrize("family", FAMILIES)
def test_box_convention_round_trip_and_reward(families, family):
    _, processor, fam = vlm.load(families[family]["path"])
    img = Image.new("RGB", (100, 130))
    x = processor(text=[vlm.prompt(processor, "x")], images=[[img]], return_tensors="pt")
    seen = vlm.seen_sizes(processor, fam, x)[0]
    box = [10, 20, 50, 65]
    written = vlm.from_pixels(box, fam, (100, 130), seen)
    by_hand = {"norm1000": [100, 154, 500, 500], "norm1": [0.1, 0.15, 0.5, 0.5]}
    if fam["box"] == "resized_px":  # Qwen2/2.5-VL: pixels of the resized image the model saw
        assert seen is not None and written == [round(10 * seen[0] / 100), round(20 * seen[1] / 130),
                                                round(50 * seen[0] / 100), round(65 * seen[1] / 130)]
    else:
        assert seen is None and written == by_hand[fam["box"]]
    tol = {"resized_px": 1.0, "norm1000": 0.1, "norm1": 0.65}[fam["box"]]  # half a unit of the written precision
    assert vlm.to_pixels(written, fam, (100, 130), seen) == pytest.approx(box, abs=tol)
    text = f'<think>a</think><answer>{{"bbox_2d": [{", ".join(map(str, written))}]}}</answer>'
    total, fmt, acc = grpo.grounding_reward(text, box, fam, (100, 130), seen)
    assert fmt == 1.0 and acc > 0.97


def taught(f):
    """The taught model in eval mode, its processor and family record, two rows and their images; seeded."""
    model, processor, fam = vlm.load(f["taught"])
    torch.manual_seed(0)
    return model.eval(), processor, fam, f["rows"][:2], [grpo.load_image(r) for r in f["rows"][:2]]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_row_of_a_padded_batch_scores_as_the_row_alone(families, family):
    """Rollout and log-probs of a 2-image batch (different image sizes: padded, different pixel shares) equal
    those of each prompt alone: take() cuts pixel_values / tiles / cross-attention right, and left padding
    changes nothing."""
    model, processor, fam, rows, images = taught(families[family])
    x, ids, mask, texts = grpo.rollout(model, processor, rows, images, 1, 4, temperature=0)
    lp, H = grpo.token_stats(model, x, ids, 1.0, micro_batch_size=1)
    for j in range(2):
        xj, idj, mj, tj = grpo.rollout(model, processor, rows[j:j + 1], images[j:j + 1], 1, 4, temperature=0)
        assert tj == texts[j:j + 1]
        lpj, Hj = grpo.token_stats(model, xj, idj, 1.0, micro_batch_size=1)
        n = int(mj.sum())
        assert torch.allclose(lp[j, :n], lpj[0, :n], atol=1e-4) and torch.allclose(H[j, :n], Hj[0, :n], atol=1e-4)
    # and a 2-row micro-batch of the same padded batch gives the same numbers as 1-row micro-batches
    lp2, _ = grpo.token_stats(model, x, ids, 1.0, micro_batch_size=2)
    assert torch.allclose(lp2 * mask, lp * mask, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_vicra_no_image_and_vepo_perturbed_forwards_change_the_image(families, family):
    """VICRA's discard forward (Mllama: no <|image|>, pixels or cross-attention mask) and a distortion, and
    VEPO's perturbed pixels, must each move the next-token distributions: a forward that silently kept the
    clean image would give w = 0 and JSD = 0 exactly."""
    import vepo
    import vicra
    model, processor, fam, rows, images = taught(families[family])
    x, ids, mask, _ = grpo.rollout(model, processor, rows, images, 2, 4, temperature=1.0)
    p_img = grpo.token_stats(model, x, ids, 1.0, 4)[0].exp()
    m = mask.bool()
    for kind in ("discard", "noise"):
        xn = vicra.vicra_inputs(processor, rows, images, ids, mask, 2, kind, x.get("image_grid_thw"), seed=0)
        if kind == "discard":
            assert not {"pixel_values", "cross_attention_mask"} & set(xn)
            assert not (xn["input_ids"] == fam["image_token_id"]).any()
        p_no = vicra.vicra_stats(model, x, xn, ids, 1.0, 4)[0]
        assert (p_img - p_no)[m].abs().max() > 0, kind
    # the control: noise of std 0 keeps the clean image, and the signals are then exactly 0 (CPU is deterministic)
    for noise, std in (("gauss", 0.0), ("gauss", 0.5), ("patch", 0.5)):
        jsd, dH = vepo.visual_signals(model, processor.image_processor, x, ids, 1.0, 4, noise, std, 0.6,
                                      torch.Generator().manual_seed(0))
        assert torch.isfinite(jsd).all() and torch.isfinite(dH).all()
        assert (jsd[m].max() > 0) == (std > 0) and (dH[m].abs().max() > 0) == (std > 0), (noise, std)


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_parameters_are_the_image_path(families, family):
    """--vision_lr's group (vlm.vision_parameters) is the image path, told apart by gradients rather than by
    names: a forward without the image (VICRA's discard input) reaches none of it, and every parameter that only
    the image's forward reaches is in it (tower and projector), except Mllama's cross-attention decoder layers,
    which belong to the language model (without an image they are skipped)."""
    import vicra
    model, processor, fam, rows, images = taught(families[family])
    x, ids, mask, _ = grpo.rollout(model, processor, rows, images, 1, 4, temperature=1.0)
    xn = vicra.vicra_inputs(processor, rows, images, ids, mask, 1, "discard", x.get("image_grid_thw"), seed=0)

    def reached(inputs):
        model.zero_grad(set_to_none=True)
        (grpo.token_logprobs(model, inputs, ids, 1.0)[0] * mask).sum().backward()
        return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}

    with_image, without = reached(x), reached(xn)
    names = {id(p): n for n, p in model.named_parameters()}
    vis = {names[id(p)] for p in vlm.vision_parameters(model)}
    assert vis and not vis & without
    xattn = tuple(f"model.language_model.layers.{i}." for i in getattr(model.config.get_text_config(),
                                                                      "cross_attention_layers", []))
    image_only = {n for n in with_image - without if not n.startswith(xattn)}
    assert image_only and image_only <= vis, sorted(image_only - vis)[:5]
    assert {names[id(p)] for p in vlm.visual_module(model, fam).parameters()} <= vis  # the projector EGG hooks


@pytest.mark.parametrize("script", ["grpo.py", "ecvgpo.py", "vicra.py", "vepo.py"])
@pytest.mark.parametrize("family", FAMILIES)
def test_two_steps_change_the_weights(families, family, script, tmp_path, monkeypatch):
    """Two full steps of each script on each family (rollout, rewards, old / reference / method passes,
    micro-batches that cut groups, the update) move the weights; run in-process, as `python script.py`."""
    f = families[family]
    out = str(tmp_path / "out")
    argv = [script, "--model", f["taught"], "--data", f"{f['data']}/detail.jsonl", "--val", f"{f['data']}/detail.jsonl",
            "--out_dir", out, "--steps", "2", "--G", "8", "--batch_size", "2", "--micro_batch_size", "5",
            "--max_new_tokens", "4", "--eval_every", "0", "--save_every", "0", "--lr", "1e-3", "--threads", "1",
            "--device", "cpu", "--dtype", "float32"]
    if script == "vepo.py":
        argv += ["--k", "0.5"]
    monkeypatch.setattr(sys, "argv", argv)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    finally:  # the script installs its own Ctrl-C handler
        signal.signal(signal.SIGINT, handlers[0]), signal.signal(signal.SIGTERM, handlers[1])
    log = [json.loads(line) for line in open(f"{out}/log.jsonl")]
    assert [r["step"] for r in log] == [1, 2] and min(r["std0_frac"] for r in log) < 1  # some group had signal
    before, after = load_file(f"{f['taught']}/model.safetensors"), load_file(f"{out}/model.safetensors")
    assert before.keys() == after.keys()
    moved = max((after[k] - before[k]).abs().max().item() for k in before)
    assert moved > 1e-5, f"{script} on {family}: no weight moved (rewards {[r['reward'] for r in log]})"
