"""grpo.py at scale, on the tiny checkpoint and 2 CPU ranks (gloo): --fsdp equals one process, resumes exactly and
exports a folder vlm.load reads with the sharded model's logits; --lora_r trains the adapters only, starts at KL 0
and exports merged adapters with the adapted model's logits; at mu = 1 skipping the old pass changes nothing, at
mu = 2 the pass still runs; the reference runs in the policy's compute dtype (KL exactly 0 at step 0)."""
import copy
import functools
import json
import os
import runpy
import signal
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import grpo
import vlm
from data.shapes.prepare import make_split

torch.set_num_threads(1)  # 2-core machines shared with other jobs
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CKPT = os.path.join(ROOT, "checkpoints", "tiny-shapes")
RUN = ["--model", CKPT, "--batch_size", "2", "--G", "4", "--max_new_tokens", "32", "--micro_batch_size", "4",
       "--eval_every", "0", "--save_every", "0", "--threads", "1", "--lr", "3e-4", "--device", "cpu"]
pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(CKPT, "model.safetensors")),
                                reason="needs the shipped checkpoint (a random model earns reward 0: nothing moves)")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shapes"))
    make_split("grounding", "train", 48, 0, out, progress=False)
    make_split("grounding", "val", 4, 0, out, progress=False)
    return ["--data", os.path.join(out, "grounding_train.jsonl"), "--val", os.path.join(out, "grounding_val.jsonl")]


def torchrun(args):
    """grpo.py on 2 CPU ranks (gloo)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "grpo.py"]
    out = subprocess.run(cmd + args, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def in_process(args, monkeypatch):
    """Run grpo.py's main in this process (no interpreter start-up, ~3 s a step) and return its globals."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(sys, "argv", ["grpo.py"] + args)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        return runpy.run_path(os.path.join(ROOT, "grpo.py"), run_name="__main__")
    finally:
        signal.signal(signal.SIGINT, handlers[0]), signal.signal(signal.SIGTERM, handlers[1])


def log(path):
    return [json.loads(x) for x in open(os.path.join(path, "log.jsonl"))]


def logits(model, processor, n=2):
    """Teacher-forced logits of n fixed prompts (shapes images) + a fixed completion."""
    rows = grpo.load_rows(os.path.join(ROOT, "data", "shapes", "grounding_val.jsonl"))[:n]
    x = grpo.encode(processor, rows, [grpo.load_image(r) for r in rows])
    ids = processor.tokenizer(["<think>the red circle</think><answer>[1, 2, 30, 40]</answer>"] * n,
                              return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(**grpo.with_completion(x, ids, torch.ones_like(ids))).logits.float()


@pytest.fixture(scope="module")
def fsdp_run(data, tmp_path_factory):
    """--fsdp on 2 ranks: 1 step, then --resume for a second one.
    token-mean: the loss is a plain sum over tokens, so 2 ranks x 1 chunk and 1 process x 2 chunks normalise it
    identically."""
    tmp = tmp_path_factory.mktemp("fsdp")
    args = RUN + data + ["--fsdp", "--loss_agg", "token-mean", "--beta", "0.04", "--out_dir", str(tmp / "run")]
    torchrun(args + ["--steps", "1"])
    # a second launch, as a real resume is (running both in one launch, re-initialising the process group in
    # the same processes, hung inside DCP's load now and then); it ends with an eval under FSDP
    torchrun(args + ["--steps", "2", "--resume", "--eval_every", "2", "--val_n", "4"])
    return tmp / "run"


def test_fsdp_one_step_and_resume_equal_one_process_two_steps_with_grad_accum(fsdp_run, data, tmp_path,
                                                                               monkeypatch):
    in_process(RUN + data + ["--grad_accum", "2", "--loss_agg", "token-mean", "--beta", "0.04", "--steps", "2",
                             "--out_dir", str(tmp_path / "one")], monkeypatch)
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(fsdp_run / "model.safetensors")
    init = load_file(os.path.join(CKPT, "model.safetensors"))
    # Reduce-scatter and local accumulation sum the gradients in different orders (~1e-7 relative), which AdamW's
    # division by sqrt(v) carries into the weights unevenly: measured max difference 3.3e-6 after 2 steps against a
    # movement of 6e-4 per weight (the DDP test's tolerance and reasoning; resuming adds nothing: 1 + 1 steps
    # under --fsdp equal 2 straight ones bit for bit, measured). A wrong reduction (sum instead of mean, a lost
    # shard or rank) or a resume that loses the AdamW moments (step 2 then moves each weight by ~lr = 3e-4, as a
    # first Adam step does) differs by the movement itself.
    assert set(init) <= set(b) and all(torch.allclose(a[k], b[k], atol=1e-5, rtol=0) for k in a)
    assert max((a[k] - init[k]).abs().max().item() for k in a) > 1e-4  # the comparison is not vacuous
    assert [r["reward"] for r in log(tmp_path / "one")] == [r["reward"] for r in log(fsdp_run)]  # same data order
    assert "val_grounding_acc" in log(fsdp_run)[-1]  # the eval under FSDP ran (and did not hang)


def test_fsdp_export_loads_with_vlm_load_and_gives_the_sharded_models_logits(fsdp_run):
    """The sharded model: the checkpoint's DCP shards read into a fully_shard-ed model (one rank here: DCP
    reshards the 2-rank checkpoint on load); the export: a plain vlm.load of the folder."""
    exported, processor, _ = vlm.load(str(fsdp_run))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = grpo.shard(vlm.load(CKPT)[0], torch.float32)
        grpo.load_sharded(str(fsdp_run), model, torch.optim.AdamW(model.parameters()))
        want = logits(model.eval(), processor)
    finally:
        dist.destroy_process_group()
    before = logits(vlm.load(CKPT)[0].eval(), processor)
    assert (want - before).abs().max() > 1e-3  # the checkpoint is the trained model, not the initial one
    assert torch.allclose(logits(exported.eval(), processor), want, atol=1e-5, rtol=0)


def test_lora_trains_adapters_only_starts_at_kl_zero_and_exports_merged(data, tmp_path, monkeypatch):
    r, out = 4, tmp_path / "lora"
    g = in_process(RUN + data + ["--lora_r", str(r), "--lora_alpha", "8", "--lr", "3e-3", "--beta", "0.04",
                                 "--steps", "1", "--out_dir", str(out)], monkeypatch)
    assert g["U"]["kl"] == 0.0 and g["ref"] is g["model"]  # the reference: the same model, adapters off
    (base, _, _), (exported, processor, _) = vlm.load(CKPT), vlm.load(str(out))
    init, merged = base.state_dict(), exported.state_dict()  # the model's own names (the files' may differ)
    targets = {n + ".weight" for n in grpo.add_lora(vlm.load(CKPT)[0], r, 8.0).targeted_module_names}
    targets = {k.removeprefix("base_model.model.") for k in targets}
    assert targets and all(".language_model." in k for k in targets)  # the vision tower is frozen by default
    for k in init:  # only the adapters moved: everything else is the initial model, bit for bit ...
        if k not in targets:
            assert torch.equal(merged[k], init[k]), k
    deltas = [merged[k] - init[k] for k in targets]  # ... and each adapted weight moved by (alpha / r) B A: rank <= r
    assert all(torch.linalg.matrix_rank(d, atol=1e-7) <= r for d in deltas)
    assert max(d.abs().max().item() for d in deltas) > 1e-5
    # the adapted model (fresh base + the checkpoint's adapters) and the merged export give the same logits
    adapted = grpo.add_lora(vlm.load(CKPT)[0], r, 8.0)
    grpo.load_sharded(str(out), adapted, torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad]))
    want = logits(adapted.eval(), processor)
    with adapted.disable_adapter():
        effect = (logits(adapted, processor) - want).abs().max().item()
    err = (logits(exported.eval(), processor) - want).abs().max().item()
    print(f"LoRA export vs adapted model: max |logit difference| {err:.2e}; the adapters move logits by {effect:.2e}")
    # measured 5.5e-5 against an effect of 1.1: x (W + s B A)^T and x W^T + s (x A^T) B^T round differently in
    # float32 (~1e-7 relative per product), and attention carries it through the layers. A merge that is missing,
    # doubled or mis-scaled (alpha / r) is off by the order of the effect itself.
    assert effect > 0.1 and err < 5e-4


def test_old_pass_skipped_at_mu1_changes_nothing_kept_at_mu2_and_kl_starts_at_zero(data, tmp_path, monkeypatch):
    """bf16 autocast on the CPU, beta 0.04. Teacher-forced forwards under no_grad that score more than one token
    are the old pass's and the reference's (generate scores one token at a time): n per pass."""
    import transformers
    arch = transformers.AutoConfig.from_pretrained(CKPT).architectures[0]
    Qwen = getattr(transformers, arch)  # the shipped checkpoint's class (a tiny Qwen3-VL)
    calls, forward = [], Qwen.forward

    @functools.wraps(forward)  # generate() validates its arguments against forward's signature
    def counted(self, *a, **kw):
        calls.append(not torch.is_grad_enabled() and kw.get("logits_to_keep", 0) > 1)
        return forward(self, *a, **kw)

    monkeypatch.setattr(Qwen, "forward", counted)
    args = RUN + data + ["--dtype", "bfloat16", "--beta", "0.04", "--steps", "1"]
    n = 8 // 4  # batch_size 2 x G 4 sequences in micro-batches of 4
    runs = {}
    for name, extra in [("skip", []), ("kept", ["--old_pass"]), ("mu2", ["--mu", "2"])]:
        calls.clear()
        g = in_process(args + extra + ["--out_dir", str(tmp_path / name)], monkeypatch)
        runs[name] = (sum(calls), g["U"]["kl"], {k: v.clone() for k, v in g["model"].state_dict().items()},
                      log(tmp_path / name)[0])
    assert [runs[k][0] for k in ("skip", "kept", "mu2")] == [n, 2 * n, 2 * n]  # ref only; ref + old; ref + old
    # the reference runs in the policy's compute (float32 weights under the same autocast): KL exactly 0 at step 0
    # (a bf16-loaded reference gave 4e-5 here)
    assert runs["skip"][1] == 0.0 and runs["kept"][1] == 0.0
    a, b = runs["skip"][2], runs["kept"][2]
    # ratio = exp(logp - logp.detach()) = 1 with the gradient of logp, which the old pass gives too when its
    # log-probs equal the update's (same weights, same micro-batches): identical up to float noise
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    assert any(not torch.equal(a[k], runs["mu2"][2][k]) for k in a)  # (mu = 2 does move further)
    assert runs["skip"][3]["entropy"] == pytest.approx(runs["kept"][3]["entropy"], abs=1e-3)  # logged from the update


@pytest.mark.parametrize("name, blocks", [("qwen2.5-vl-7b", 28 + 32), ("internvl3-8b", 28 + 24),
                                          ("llama-3.2-11b-vision", 40 + 40)])
def test_shard_blocks_and_lora_targets_found_for_every_family(name, blocks):
    """shard() wraps the classes a model names in _no_split_modules, add_lora() the Linear layers under
    get_decoder(): both must find every decoder layer / vision block and only language-model layers (meta device:
    the released configs, written in bench.py; Llama's vision encoder has 32 local + 8 global layers, its
    decoder 32 self- + 8 cross-attention layers)."""
    import bench
    model = bench.build_real(name)
    names = set(model._no_split_modules)
    assert sum(type(m).__name__ in names for m in model.modules()) == blocks
    lm_linears = sum(isinstance(m, torch.nn.Linear) for m in model.get_decoder().modules())
    targets = grpo.add_lora(copy.deepcopy(model), 8, 16.0).targeted_module_names  # (bench caches the model)
    assert len(targets) == lm_linears and all(".language_model." in n for n in targets)
