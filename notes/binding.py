"""
Does a grounding checkpoint use the query? The measurements behind notes/sft.md ("Why the box ignores the
query"), kept runnable:

    python notes/binding.py checkpoints/tiny-shapes

1. swap: 2-object scenes whose objects differ, asked once per object ("the {colour} {shape}"); greedy boxes.
   A model that binds moves its box with the query; one that does not gives the same box for both.
2. margin: teacher-forced loss of the coordinate tokens of the true box, under the other object's query minus
   under the true query (nats per coordinate token). 0 = the query does not change the box distribution.
3. probes: linear probes (70/30 split, L2-regularised logistic regression) on the decoder's residual stream:
   colour / shape of the object under each visual token, and the query's colour at the position that
   predicts x1, at the decoder input and after each layer.
4. norms: mean residual norm of visual and text tokens at the decoder input and after each layer.
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import vlm  # noqa: E402
from grpo import iou, load_image, load_rows, parse_box, rollout  # noqa: E402
from sft import sft_batch  # noqa: E402


def two_object_pairs(rows, n):
    """[(row asking for object a, row asking for object b)] from 2-object scenes whose objects differ."""
    pairs = []
    for r in rows:
        if r["n_objects"] != 2:
            continue
        a, b = r["objects"]
        if (a["colour"], a["shape"]) == (b["colour"], b["shape"]):
            continue
        pairs.append([dict(r, query=f"the {o['colour']} {o['shape']}", box=o["box"], other=p["box"])
                      for o, p in ((a, b), (b, a))])
        if len(pairs) == n:
            break
    return pairs


def swap(model, processor, fam, pairs):
    flat, res = [q for p in pairs for q in p], []
    for i in range(0, len(flat), 32):
        chunk = flat[i:i + 32]
        images = [load_image(r) for r in chunk]
        inputs, _, _, texts = rollout(model, processor, chunk, images, 1, 64, temperature=0)
        for r, im, t, thw in zip(chunk, images, texts, inputs["image_grid_thw"]):
            box = parse_box(t)
            if box is None:
                res.append(None)
                continue
            px = vlm.to_pixels(box, fam, im.size, vlm.resized_size(processor, thw))
            c = ((px[0] + px[2]) / 2, (px[1] + px[3]) / 2)
            d2 = lambda b: ((b[0] + b[2]) / 2 - c[0]) ** 2 + ((b[1] + b[3]) / 2 - c[1]) ** 2  # noqa: E731
            res.append(dict(on_target=iou(px, r["box"]) > 0.5, on_other=iou(px, r["other"]) > 0.5,
                            nearer_target=d2(r["box"]) < d2(r["other"]), centre=c))
    ok = [x for x in res if x]
    same = [abs(a["centre"][0] - b["centre"][0]) + abs(a["centre"][1] - b["centre"][1]) < 4
            for a, b in zip(res[0::2], res[1::2]) if a and b]
    return dict(queries=len(res), on_target=sum(x["on_target"] for x in ok) / len(res),
                on_other=sum(x["on_other"] for x in ok) / len(res),
                nearer_target=sum(x["nearer_target"] for x in ok) / len(res), same_box=sum(same) / len(pairs))


def coordinate_positions(processor, labels):
    """per row: positions t whose label is a coordinate token (the model predicts it at t - 1)."""
    tok = processor.tokenizer
    return [[t for t, y in enumerate(row) if y >= 0 and tok.decode([y]).strip().isdigit()] for row in labels.tolist()]


@torch.no_grad()
def margin(model, processor, fam, pairs):
    true = [q for p in pairs for q in p]
    swapped = [dict(q, query=p[1 - k]["query"]) for p in pairs for k, q in enumerate(p)]

    def coord_loss(rows):
        batch, labels = sft_batch(processor, fam, rows, [True] * len(rows), model.device)
        logp = torch.log_softmax(model(**batch).logits[:, :-1].float(), -1)
        y = labels[:, 1:]
        lp = logp.gather(2, y.clamp(min=0)[..., None])[..., 0]
        return torch.stack([-lp[i, [t - 1 for t in ts]].mean() for i, ts in enumerate(coordinate_positions(processor, labels))])
    lt = torch.cat([coord_loss(true[i:i + 16]) for i in range(0, len(true), 16)])
    ls = torch.cat([coord_loss(swapped[i:i + 16]) for i in range(0, len(swapped), 16)])
    return dict(margin=(ls - lt).mean().item(), true_better=(ls > lt).float().mean().item())


def linear_probe(X, y, k):
    """held-out accuracy of an L2-regularised multinomial logistic regression (70/30 split, fixed seed)."""
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, te = idx[:int(0.7 * len(y))], idx[int(0.7 * len(y)):]
    X = (X - X[tr].mean(0)) / (X[tr].std(0) + 1e-6)
    W = torch.zeros(X.shape[1], k, requires_grad=True)
    b = torch.zeros(k, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=200)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(X[tr] @ W + b, y[tr]) + 1e-3 * (W ** 2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return ((X[te] @ W + b).argmax(1) == y[te]).float().mean().item()


@torch.no_grad()
def probes_and_norms(model, processor, fam, rows, grid=7, cell=16):
    colours = sorted({o["colour"] for r in rows for o in r["objects"]})
    shapes = sorted({o["shape"] for r in rows for o in r["objects"]})
    tok_feats, tok_y, q_feats, q_y, norms = {}, {"colour": [], "shape": []}, {}, [], {}
    for i in range(0, len(rows), 16):
        chunk = rows[i:i + 16]
        batch, labels = sft_batch(processor, fam, chunk, [True] * len(chunk), model.device)
        hs = model(**batch, output_hidden_states=True).hidden_states  # input, then after each layer
        img = batch["input_ids"] == model.config.image_token_id
        txt = (batch["attention_mask"] == 1) & ~img
        for l, h in enumerate(hs):
            norms.setdefault(l, []).append((h[img].norm(dim=-1).mean().item(), h[txt].norm(dim=-1).mean().item()))
        for j, (r, ts) in enumerate(zip(chunk, coordinate_positions(processor, labels))):
            words = r["query"].split()
            if len(words) == 3:  # "the {colour} {shape}": the query's colour at the x1-predicting position
                q_y.append(colours.index(words[1]))
                for l, h in enumerate(hs):
                    q_feats.setdefault(l, []).append(h[j, ts[0] - 1])
            for k, p in enumerate(img[j].nonzero()[:, 0].tolist()):  # visual tokens in raster order
                cy, cx = cell // 2 + cell * (k // grid), cell // 2 + cell * (k % grid)
                on = [o for o in r["objects"] if o["box"][0] <= cx <= o["box"][2] and o["box"][1] <= cy <= o["box"][3]]
                if len(on) != 1:
                    continue
                tok_y["colour"].append(colours.index(on[0]["colour"]))
                tok_y["shape"].append(shapes.index(on[0]["shape"]))
                for l, h in enumerate(hs):
                    tok_feats.setdefault(l, []).append(h[j, p])
    out = {f"token {name}": [round(linear_probe(torch.stack(tok_feats[l]), torch.tensor(y), len(set(y))), 3)
                             for l in sorted(tok_feats)] for name, y in tok_y.items()}
    out["query colour at x1"] = [round(linear_probe(torch.stack(q_feats[l]), torch.tensor(q_y), len(colours)), 3)
                                 for l in sorted(q_feats)]
    out["norm visual / text"] = [[round(sum(v[0] for v in vs) / len(vs), 1), round(sum(v[1] for v in vs) / len(vs), 1)]
                                 for _, vs in sorted(norms.items())]
    return out


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    model, processor, fam = vlm.load(sys.argv[1])
    model.eval()
    val = load_rows("data/shapes/grounding_val.jsonl") + load_rows("data/shapes/grounding_test.jsonl")
    train2 = [r for r in load_rows("data/shapes/grounding_train.jsonl")[:3000] if r["n_objects"] == 2][:400]
    print(json.dumps(dict(checkpoint=sys.argv[1], swap=swap(model, processor, fam, two_object_pairs(val, 60)),
                          margin=margin(model, processor, fam, two_object_pairs(val, 32)),
                          probes=probes_and_norms(model, processor, fam, train2))))
