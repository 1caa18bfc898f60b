"""Zero-shot evaluation (paper Table 4): is CLIP's image-text knowledge kept after training?

    python -m probe.zeroshot --data DIR --ckpt CKPT [--arch NAME] [--task auto|cls|retrieval]
                             [--classnames FILE] [--templates FILE] [--split NAME] [--captions FILE]
                             [--batch-size 64] [--out metrics.json]

- Classification on an ImageFolder split (``<DATA>/<split>/<class>/<image>``, split ``val``):
  top-1 and top-5 (tie rule: ``probe.metrics.hits_at_k``). Class names: ``--classnames FILE`` (one
  per line, in the sorted order of the class folders); else open_clip's ImageNet-1k names when the
  folders are the 1000 ImageNet synsets (n01440764, ...); else the folder names ('_' -> ' ').
  Prompt templates: ``--templates FILE`` (one per line, ``{}`` = the class name); else open_clip's
  80 OpenAI ImageNet templates for ImageNet, "a photo of a {}." otherwise. Both ship with open_clip.
- Image-text retrieval, recall@1/5/10 in both directions (image -> text = "text retrieval",
  text -> image = "image retrieval"), on
    * a webdataset split: a folder of ``.tar`` shards, a brace pattern or a manifest name (the
      project's sample shards are one: ``--data data/sample``), one caption per image;
    * a Flickr30k-style folder: images (in ``images/``, ``flickr30k-images/`` or the folder itself)
      and a captions file: Karpathy's ``dataset_flickr30k.json`` (the ``--split``, default test,
      of its ``images``), or ``captions.txt`` / ``*.token`` lines ``<image file>#<n><TAB><caption>``
      (Flickr30k's ``results_20130124.token``; ``#<n>`` optional). An image may have several captions.

Tokenizer: open_clip's (its BPE vocabulary ships with the package). Exit codes: 0 ok, 2 a missing
dataset or encoder (one ``error:`` line).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from pipeline.storage import write_text_atomic
from probe import datasets as D
from probe.encoder import EncoderError, describe, load_encoder
from probe.metrics import TopKMetric, retrieval_recall
from trainer import checkpoint as ckpt
from trainer.model import PretrainedUnavailable

CAPTION_FILES = ("dataset_flickr30k.json", "captions.txt", "results_20130124.token")
IMAGE_DIRS = ("images", "flickr30k-images", "flickr30k_images", ".")
WNID = re.compile(r"^n\d{8}$")
RETRIEVAL_LAYOUT = ("a webdataset split (<DATA>/*.tar, a brace pattern or a manifest name) or a Flickr30k-style "
                    "folder: <DATA>/{images,flickr30k-images}/ + <DATA>/{dataset_flickr30k.json,captions.txt,"
                    "results_20130124.token} (or --captions FILE)")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m probe.zeroshot", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--ckpt", required=True, help="export folder, trainer run or checkpoint, open_clip file or tag, or none")
    p.add_argument("--arch", default=None)
    p.add_argument("--model-config-dir", default=None)
    p.add_argument("--task", default="auto", choices=["auto", "cls", "retrieval"])
    p.add_argument("--classnames", default=None, help="text file, one class name per line (sorted folder order)")
    p.add_argument("--templates", default=None, help="text file, one prompt template per line with {}")
    p.add_argument("--split", default=None, help="ImageFolder split (val) or Karpathy split (test)")
    p.add_argument("--captions", default=None, help="captions file of a Flickr30k-style folder")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--out", default=None, help="metrics.json path (default runs/zeroshot/<encoder>/<data>-<task>/)")
    return p.parse_args(argv)


# ---- data --------------------------------------------------------------------------------------------

def _caption_file(root: Path, given: str | None) -> Path | None:
    if given:
        if not Path(given).is_file():
            raise D.DatasetError(f"captions file {given} does not exist")
        return Path(given)
    if root.is_dir():
        for name in CAPTION_FILES:
            if (root / name).is_file():
                return root / name
        tokens = sorted(root.glob("*.token"))
        if tokens:
            return tokens[0]
    return None


def _is_webdataset(spec: str) -> bool:
    p = Path(spec)
    if p.is_dir():
        return any(p.glob("*.tar"))
    return "{" in spec or spec.endswith(".tar") or (not p.exists() and Path("manifests", f"{spec}.yaml").is_file())


def read_captions(path: Path, split: str | None) -> list[tuple[str, str]]:
    """(image file name, caption) pairs, in file order."""
    if path.suffix == ".json":
        doc = json.loads(path.read_text())
        split = split or "test"
        pairs = [(img["filename"], s["raw"].strip()) for img in doc.get("images", []) if img.get("split") == split
                 for s in img.get("sentences", [])]
        if not pairs:
            raise D.DatasetError(f"{path}: no images of split {split!r} (Karpathy format: images[].split/filename/sentences[].raw)")
        return pairs
    pairs = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        name, sep, caption = line.partition("\t")
        if not sep or not caption.strip():
            raise D.DatasetError(f"{path}:{n}: expected '<image file>#<n><TAB><caption>'")
        pairs.append((name.split("#")[0].strip(), caption.strip()))
    return pairs


def _safe_image_path(image_dir: Path, name: str) -> Path:
    """A caption file names images; the name must stay inside the image folder."""
    p = Path(name)
    if p.is_absolute() or ".." in p.parts or "\\" in name:
        raise D.DatasetError(f"unsafe image name {name!r} in the captions file")
    return image_dir / p


def retrieval_samples(spec: str, captions: str | None, split: str | None, stats: dict):
    """(dataset name, generator of (RGB array, [captions]) per image). Images are decoded as the
    generator runs, so a large split is never held in memory; ``stats["skipped"]`` counts samples
    left out (unreadable, or an image named by the captions file that is not there)."""
    from pipeline.shards import Sample, iter_samples
    from trainer.data import DataError, resolve_shards

    stats.setdefault("skipped", 0)
    if _is_webdataset(spec):
        try:
            name, shards, _, _ = resolve_shards(spec)
        except (DataError, FileNotFoundError, ValueError) as e:
            raise D.DatasetError(f"{spec}: {e}; expected {RETRIEVAL_LAYOUT}") from None

        def shard_samples():
            for shard in shards:
                for s in iter_samples(shard):
                    if isinstance(s, Sample):
                        yield s.image, [s.caption]
                    else:
                        stats["skipped"] += 1
        return name, shard_samples()
    root = Path(spec)
    cap = _caption_file(root, captions)
    if cap is None:
        raise D.DatasetError(f"no retrieval data at {root}; expected {RETRIEVAL_LAYOUT}")
    base = root if root.is_dir() else cap.parent
    image_dir = next((base / d for d in IMAGE_DIRS if d != "." and (base / d).is_dir()), base)
    by_image: dict[str, list[str]] = {}
    for name, caption in read_captions(cap, split):
        by_image.setdefault(name, []).append(caption)
    paths = {name: _safe_image_path(image_dir, name) for name in by_image}

    def folder_samples():
        for name, caps in by_image.items():
            if paths[name].is_file():
                yield D.read_rgb(paths[name]), caps
            else:
                stats["skipped"] += 1
    return base.name, folder_samples()


def class_names_and_templates(classes: list[str], names_file: str | None, templates_file: str | None) -> tuple[list, list, dict]:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    imagenet = len(classes) == len(IMAGENET_CLASSNAMES) and all(WNID.match(c) for c in classes)
    if names_file:
        names = [ln.strip() for ln in Path(names_file).read_text(encoding="utf-8").splitlines() if ln.strip()]
        if len(names) != len(classes):
            raise D.DatasetError(f"{names_file} has {len(names)} class names for {len(classes)} class folders")
        names_src = names_file
    elif imagenet:
        names, names_src = list(IMAGENET_CLASSNAMES), "open_clip IMAGENET_CLASSNAMES"
    else:
        names, names_src = [c.replace("_", " ") for c in classes], "folder names"
    if templates_file:
        templates = [ln.strip() for ln in Path(templates_file).read_text(encoding="utf-8").splitlines() if ln.strip()]
        if not templates or not all("{}" in t for t in templates):
            raise D.DatasetError(f"{templates_file}: every template needs a '{{}}' for the class name")
        tmpl_src = templates_file
    elif imagenet:
        templates, tmpl_src = list(OPENAI_IMAGENET_TEMPLATES), "open_clip OPENAI_IMAGENET_TEMPLATES"
    else:
        templates, tmpl_src = ["a photo of a {}."], "default ('a photo of a {}.')"
    return names, templates, {"class_names": names_src, "templates": tmpl_src, "num_templates": len(templates)}


# ---- evaluation ---------------------------------------------------------------------------------------

def _embed_texts(enc, tokenizer, texts, batch_size, device, autocast) -> torch.Tensor:
    out = []
    for i in range(0, len(texts), batch_size):
        with torch.no_grad(), autocast:
            out.append(enc.clip.encode_text(tokenizer(texts[i:i + batch_size]).to(device), normalize=True).float())
    return torch.cat(out)


def zeroshot_classification(enc, args, device, autocast) -> tuple[str, dict]:
    import open_clip
    from tqdm import tqdm

    root = Path(args.data)
    src = D.check_items(D.open_source("cls", root, args.split or "val", train=False), "cls", root, None)
    names, templates, how = class_names_and_templates(src.class_names, args.classnames, args.templates)
    tokenizer = open_clip.get_tokenizer(enc.tokenizer_name)
    with torch.no_grad(), autocast:
        weights = open_clip.build_zero_shot_classifier(enc.clip, tokenizer, names, templates, device=device).float()
    ds = D.ClassificationDataset(src, False, enc.image_size, enc.mean, enc.std)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, num_workers=args.num_workers)
    metric = TopKMetric((1, 5), device)
    for b in tqdm(loader, desc="zero-shot", dynamic_ncols=True, mininterval=1.0):
        with torch.no_grad(), autocast:
            feats = enc.clip.encode_image(b["image"].to(device), normalize=True).float()
        metric.update(feats @ weights, b["target"].to(device))
    return src.name, {**metric.compute(), "num_classes": len(names), **how}


def zeroshot_retrieval(enc, args, device, autocast) -> tuple[str, dict]:
    import open_clip
    from PIL import Image
    from tqdm import tqdm

    stats: dict = {}
    name, samples = retrieval_samples(args.data, args.captions, args.split, stats)
    transform = open_clip.image_transform(enc.image_size, is_train=False, mean=enc.mean, std=enc.std)
    image_feats, texts, owner, pending = [], [], [], []

    def flush():
        with torch.no_grad(), autocast:
            image_feats.append(enc.clip.encode_image(torch.stack(pending).to(device), normalize=True).float())
        pending.clear()

    n_images = 0
    for image, captions in tqdm(samples, desc="images", dynamic_ncols=True, mininterval=1.0):
        pending.append(transform(Image.fromarray(image)))
        texts += captions
        owner += [n_images] * len(captions)
        n_images += 1
        if len(pending) == args.batch_size:
            flush()
    if pending:
        flush()
    if not n_images:
        raise D.DatasetError(f"no readable image-caption pair in {args.data}; expected {RETRIEVAL_LAYOUT}")
    txt = _embed_texts(enc, open_clip.get_tokenizer(enc.tokenizer_name), texts, args.batch_size, device, autocast)
    recall = retrieval_recall(torch.cat(image_feats) @ txt.t(), torch.tensor(owner), (1, 5, 10))
    return name, {**recall, "num_images": n_images, "num_texts": len(texts), "skipped": stats["skipped"]}


def main(argv=None) -> int:
    import contextlib

    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    try:
        task = args.task
        if not args.data.strip():
            raise D.DatasetError("no dataset given (--data, or DATA= for make)")
        if task == "auto" and not Path(args.data).exists() and not _is_webdataset(args.data):
            raise D.DatasetError(f"no zero-shot data at {args.data}; expected an ImageFolder split "
                                 f"({D.LAYOUTS['imagefolder']}) or {RETRIEVAL_LAYOUT}")
        if task == "auto":
            task = "retrieval" if _is_webdataset(args.data) or _caption_file(Path(args.data), args.captions) else "cls"
        if task == "cls":  # check the layout before loading the encoder
            D.open_source("cls", Path(args.data), args.split or "val", train=False)
        elif not _is_webdataset(args.data) and _caption_file(Path(args.data), args.captions) is None:
            raise D.DatasetError(f"no retrieval data at {args.data}; expected {RETRIEVAL_LAYOUT}")
        enc = load_encoder(args.ckpt, args.arch, args.model_config_dir, device)
        run = zeroshot_classification if task == "cls" else zeroshot_retrieval
        name, metrics = run(enc, args, device, autocast)
    except (D.DatasetError, EncoderError, PretrainedUnavailable, ckpt.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    info = describe(enc)
    out = Path(args.out or Path("runs/zeroshot") / info["name"] / f"{name}-{task}" / "metrics.json")
    record = {"task": f"zeroshot_{task}", "dataset": name, "metrics": metrics, "encoder": info}
    write_text_atomic(out, json.dumps(record, indent=1) + "\n")
    print(json.dumps({"out": str(out), "task": f"zeroshot_{task}", "dataset": name,
                      **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
