"""ViRL39K (and the other parquet-shipped reasoning sets: Geometry3K, MMK12) -> our reasoning jsonl.

    python data/virl39k/prepare.py --parquet <ViRL39K folder>/39Krelease.parquet      # TIGER-Lab/ViRL39K
    python data/virl39k/prepare.py --hf TIGER-Lab/ViRL39K                              # needs `datasets` + the hub
    python data/virl39k/prepare.py --name geometry3k --parquet <geometry3k>/data       # hiyouga/geometry3k
    python data/virl39k/prepare.py --name mmk12 --parquet <MMK12>/data                 # FanqingM/MMK12

Reads one parquet file or every *.parquet under a folder; the split is the file name's prefix (HF's
data/<split>-00000-of-00001.parquet) or `train` (39Krelease.parquet). Columns, whichever exist:
  question  `question` (TIGER-Lab/ViRL39K, MMK12) or `problem` (Geometry3K, embedded-image ViRL39K copies);
            <image> placeholders are dropped (grpo.py puts the image before the text itself);
  answer    `answer`; a whole-answer \\boxed{...} is unwrapped (the reward compares the model's \\boxed{});
  image     `image` or `images`: a path (relative to the parquet's folder: TIGER-Lab ships images.zip,
            unzip it next to the parquet), a {bytes, path} struct (HF's Image feature), or a list of them;
  id        `qid`, `id` or the row number; `category`, `subject`, `source` are kept when present.
Embedded images are written out as files (<out>/images/<split>/<id>.<ext>, original bytes); referenced
ones are linked (<out>/src -> the parquet's folder). Rows with no image or with several images are
skipped and counted (grpo.py feeds one image per prompt).
Writes <out>/<split>.jsonl (out: data/<name>), and, when the source has no validation split, holds out
--val_n rows of train (seeded) as val.jsonl: the README's commands read train.jsonl and val.jsonl.
"""
import argparse
import glob
import io
import os
import random
import re
import sys

from PIL import Image
from tqdm import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # data/, for common.py
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repo root, for grpo.last_boxed
import common  # noqa: E402
from grpo import last_boxed  # noqa: E402

SPLITS = ("train", "validation", "val", "test", "testmini")
IMAGE_TOKEN = re.compile(r"<image>\s*")


def split_of(path):
    name = os.path.basename(path).lower()
    return next((s for s in sorted(SPLITS, key=len, reverse=True) if name.startswith(s)), "train")


def read_parquet(path):
    """The rows of a parquet file as dicts (pyarrow; no pandas needed)."""
    import pyarrow.parquet as pq
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise ValueError(f"{path}: cannot read as parquet ({e})") from None


def unwrap_answer(a):
    a = str(a).strip()
    inner = last_boxed(a)
    return inner.strip() if inner is not None and a.startswith("\\boxed{") and a.endswith("}") \
        and len(inner) == len(a) - len("\\boxed{}") else a


def save_image(value, out_dir, split, key, src_link, where):
    """One image value -> a path relative to out_dir. Bytes and PIL images are written as files."""
    if isinstance(value, dict) and value.get("bytes"):
        data = value["bytes"]
        try:
            fmt = Image.open(io.BytesIO(data)).format or "PNG"
        except OSError as e:
            raise ValueError(f"{where}: embedded image is not readable ({e})") from None
        rel = f"images/{split}/{key}.{'jpg' if fmt == 'JPEG' else fmt.lower()}"
        path = os.path.join(out_dir, rel)
        if not (os.path.exists(path) and open(path, "rb").read() == data):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
        return rel
    if isinstance(value, Image.Image):  # --hf: datasets decodes images
        rel = f"images/{split}/{key}.png"
        path = os.path.join(out_dir, rel)
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            value.convert("RGB").save(path)
        return rel
    p = value.get("path") if isinstance(value, dict) else value
    if not isinstance(p, str) or not p or src_link is None:
        raise ValueError(f"{where}: image value {str(value)[:80]!r} is neither bytes nor a path")
    rel = f"{src_link}/{p}"
    if not os.path.exists(os.path.join(out_dir, rel)):
        raise FileNotFoundError(f"{where}: image '{os.path.join(out_dir, rel)}' not found (TIGER-Lab/ViRL39K: "
                                f"unzip images.zip next to the parquet)")
    return rel


def convert(items, where_prefix, out_dir, split, name, src_link):
    """Source rows -> (our rows, skipped counts)."""
    rows, skipped = [], {"no image": 0, "several images": 0}
    for n, it in enumerate(tqdm(items, desc=f"{name} {split}", leave=False)):
        where = f"{where_prefix}: row {n}"
        q = it.get("question", it.get("problem"))
        if q is None or "answer" not in it:
            raise ValueError(f"{where}: needs a `question` or `problem` column and an `answer` column; "
                             f"has {sorted(it)}")
        ims = it.get("images", it.get("image"))
        ims = [] if ims is None else (list(ims) if isinstance(ims, (list, tuple)) else [ims])
        if not ims:
            skipped["no image"] += 1
            continue
        if len(ims) > 1:
            skipped["several images"] += 1
            continue
        answer = unwrap_answer(it["answer"])
        if not answer:
            raise ValueError(f"{where}: empty answer")
        key = str(it.get("qid", it.get("id", n)))
        row = dict(task="reasoning", image=save_image(ims[0], out_dir, split, re.sub(r"[^\w.-]", "_", key),
                                                      src_link, where),
                   question=IMAGE_TOKEN.sub("", str(q)).strip(), answer=answer, source=name, split=split, id=key)
        row.update({k: it[k] for k in ("category", "subject") if it.get(k) is not None})
        rows.append(row)
    return rows, skipped


def prepare(out_dir, parquet=None, hf=None, name="virl39k", val_n=500, seed=0):
    splits = {}
    if hf:
        try:
            import datasets
        except ImportError:
            raise ImportError("--hf needs the `datasets` package (pip install datasets); or download the parquet "
                              "files and pass --parquet") from None
        for split, ds in datasets.load_dataset(hf).items():
            splits[split] = convert(ds, f"{hf} [{split}]", out_dir, split, name, None)
    else:
        files = [parquet] if os.path.isfile(parquet) else sorted(glob.glob(os.path.join(parquet, "**", "*.parquet"),
                                                                           recursive=True))
        if not files:
            raise FileNotFoundError(f"no parquet file at '{parquet}'")
        src = common.link_images(out_dir, "src", os.path.dirname(os.path.abspath(files[0])))
        if len({os.path.dirname(os.path.abspath(f)) for f in files}) > 1:
            raise ValueError(f"{parquet}: parquet files in several folders; pass one folder of them")
        for f in files:
            rows, skipped = convert(read_parquet(f), f, out_dir, split_of(f), name, src)
            old = splits.get(split_of(f), ([], {}))
            splits[split_of(f)] = (old[0] + rows, {k: old[1].get(k, 0) + v for k, v in skipped.items()})
    counts = {}
    for split, (rows, skipped) in splits.items():
        if any(skipped.values()):
            print(f"{name} {split}: skipped {skipped}")
    if "train" in splits and not ({"val", "validation"} & set(splits)) and val_n > 0:
        rows = splits["train"][0]
        order = random.Random(seed).sample(range(len(rows)), len(rows))
        held = set(order[:val_n])
        splits["val"] = ([rows[i] for i in sorted(held)], {})
        splits["train"] = ([r for i, r in enumerate(rows) if i not in held], splits["train"][1])
    for split, (rows, _) in sorted(splits.items()):
        counts[f"{split}.jsonl"] = common.write_jsonl(os.path.join(out_dir, f"{split}.jsonl"), rows)
    return counts


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parquet", help="a parquet file, or a folder searched for *.parquet")
    p.add_argument("--hf", help="a Hugging Face dataset id, read with `datasets` (hub access needed)")
    p.add_argument("--name", default="virl39k", help="virl39k | geometry3k | mmk12 | ...: names the output folder")
    p.add_argument("--out", help="default: data/<name>")
    p.add_argument("--val_n", type=int, default=500, help="train rows held out as val.jsonl if there is no val split")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if bool(a.parquet) == bool(a.hf):
        p.error("give exactly one of --parquet, --hf")
    prepare(a.out or os.path.join("data", a.name), a.parquet, a.hf, a.name, a.val_n, a.seed)
