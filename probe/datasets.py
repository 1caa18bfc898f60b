"""Probe datasets, read from their standard on-disk layouts (given by path, never downloaded).

    seg     PASCAL VOC 2012   <DATA>/VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation}
                              (DATA may also be the VOCdevkit or VOC2012 folder itself); torchvision's
                              VOCSegmentation lists it. 21 classes (background + 20), 255 = ignore.
                              Splits: train (1464) / val (1449).
            ADE20K            <DATA>/ADEChallengeData2016/{images,annotations}/{training,validation}/
                              (DATA may be ADEChallengeData2016 itself). 150 classes; label 0 ("other")
                              is ignored, 1..150 become 0..149. Class names from objectInfo150.txt if present.
    depth,  NYUv2             <DATA>/<split>/img/<id>.png        RGB (480x640)
    normal                    <DATA>/<split>/depth/<id>.png      16-bit PNG, depth in millimetres, 0 = invalid
                              <DATA>/<split>/norm/<id>.png       8-bit RGB, n = rgb / 255 * 2 - 1, (0,0,0) = invalid
                              splits: train (795) / test (654), the official split. img/ and norm/ are
                              exactly Bae et al.'s NYUv2 release (nyu_dataset.zip of
                              github.com/baegwangbin/surface_normal_uncertainty, normals from GeoNet);
                              depth/ holds the `depths` of the official nyu_depth_v2_labeled.mat at the
                              same 0-based index (the file names are that index, e.g. 000000.png):
                              ``python -m probe.nyu_depth`` writes it.
    cls     ImageFolder       <DATA>/<split>/<class>/<image> (ImageNet-1k, Places365-standard); splits train / val.

Images are decoded with the pipeline's bounded decoder (``pipeline.shards``); label PNGs are
checked against the same pixel cap before decoding. Items whose label file is missing are left
out and counted (``missing_labels``).

Training samples are keyed ``(index, seed)``: every random choice of the augmentation comes from
that seed, so a sample's crop does not depend on the worker, the rank or an interruption.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.shards import DEFAULT_MAX_PIXELS, decode_image, open_image

SEG_IGNORE = 255
VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]
ADE_NUM_CLASSES = 150
NYU_EIGEN_CROP = (45, 471, 41, 601)  # rows 45:471, cols 41:601 of a 480x640 image (Eigen et al. 2014)

LAYOUTS = {
    "voc": "<DATA>/VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation/<split>.txt}",
    "ade20k": "<DATA>/ADEChallengeData2016/{images,annotations}/{training,validation}/",
    "nyu": "<DATA>/<split>/img/<id>.png + <DATA>/<split>/depth/<id>.png (16-bit mm) and/or "
           "<DATA>/<split>/norm/<id>.png, splits train/test",
    "imagefolder": "<DATA>/<split>/<class>/<image>, splits train/val",
}
TASK_DATASETS = {"seg": ("voc", "ade20k"), "depth": ("nyu",), "normal": ("nyu",), "cls": ("imagefolder",)}


class DatasetError(RuntimeError):
    """The data is not where or how it is expected; the message names the expected layout."""


def layout_error(task: str, root: Path, detail: str = "") -> DatasetError:
    names = TASK_DATASETS[task]
    layouts = " or ".join(LAYOUTS[n] for n in names)
    return DatasetError(f"no {'/'.join(names)} data for task {task!r} at {root}{': ' + detail if detail else ''}; "
                        f"expected {layouts}")


# ---- reading ----------------------------------------------------------------------------------------

def read_rgb(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    try:
        return decode_image(Path(path).read_bytes(), max_pixels)[0]
    except ValueError as e:
        raise DatasetError(f"{path}: unreadable image ({' '.join(map(str, e.args))})") from None


def read_png(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A label PNG as stored (palette indices, 8/16-bit grey or RGB), size checked before decoding."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise DatasetError(f"{path}: {w}x{h} label has more than {max_pixels} pixels")
            img.load()
            return np.array(img)
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{path}: unreadable label ({e})") from None


def seg_voc(path: Path) -> np.ndarray:
    return read_png(path).astype(np.uint8)  # palette indices: 0..20, 255 = border/ignore


def seg_ade(path: Path) -> np.ndarray:
    lab = read_png(path).astype(np.int64)
    return np.where(lab == 0, SEG_IGNORE, lab - 1).astype(np.uint8)


def depth_mm_png(path: Path) -> np.ndarray:
    arr = read_png(path)
    if arr.dtype != np.uint16 and arr.dtype != np.int32:
        raise DatasetError(f"{path}: depth PNG must be 16-bit (millimetres), got {arr.dtype}")
    return arr.astype(np.float32) / 1000.0  # metres; 0 stays 0 = invalid


def normal_png(path: Path) -> np.ndarray:
    rgb = read_png(path)
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise DatasetError(f"{path}: normal PNG must be RGB")
    rgb = rgb[..., :3]
    n = rgb.astype(np.float32) / 255.0 * 2.0 - 1.0
    n[(rgb == 0).all(-1)] = 0.0  # (0, 0, 0) marks pixels without ground truth
    return n


# ---- sources: the list of (image, label) files of a split --------------------------------------------

@dataclass
class Source:
    name: str                              # voc2012 | ade20k | nyuv2 | <folder name>
    split: str
    items: list                            # (image path, label path) or (image path, class index)
    num_classes: int = 0
    class_names: list[str] = field(default_factory=list)
    read_label: object = None              # label path -> numpy array
    missing_labels: int = 0


def _voc_root(root: Path) -> Path | None:
    for cand, torch_root in ((root / "VOCdevkit" / "VOC2012", root), (root / "VOC2012", None), (root, None)):
        if (cand / "JPEGImages").is_dir() and (cand / "SegmentationClass").is_dir():
            if torch_root is None:
                if cand.name != "VOC2012" or cand.parent.name != "VOCdevkit":
                    return None
                torch_root = cand.parent.parent
            return torch_root
    return None


def _ade_root(root: Path) -> Path | None:
    for cand in (root / "ADEChallengeData2016", root):
        if (cand / "images").is_dir() and (cand / "annotations").is_dir():
            return cand
    return None


def _ade_names(ade: Path) -> list[str]:
    info = ade / "objectInfo150.txt"
    names = [f"class_{i + 1}" for i in range(ADE_NUM_CLASSES)]
    if info.is_file():
        for line in info.read_text(errors="replace").splitlines()[1:]:
            parts = line.split("\t")
            if len(parts) >= 5 and parts[0].strip().isdigit() and 1 <= int(parts[0]) <= ADE_NUM_CLASSES:
                names[int(parts[0]) - 1] = parts[-1].replace(";", ",").split(",")[0].strip()
    return names


def _paired(images: list[Path], label_dir: Path, ext: str = ".png") -> tuple[list, int]:
    items, missing = [], 0
    for img in images:
        lab = label_dir / (img.stem + ext)
        if lab.is_file():
            items.append((img, lab))
        else:
            missing += 1
    return items, missing


def open_source(task: str, data: str | Path, split: str | None, train: bool) -> Source:
    """The file list of one split of the dataset at ``data`` for ``task``; DatasetError if absent."""
    if not str(data).strip():
        raise layout_error(task, Path(""), "no dataset given (--data, or DATA= for make)")
    root = Path(data)
    if not root.exists():
        raise layout_error(task, root, "the path does not exist")
    if task == "seg":
        voc = _voc_root(root)
        if voc is not None:
            from torchvision.datasets import VOCSegmentation

            split = split or ("train" if train else "val")
            try:
                ds = VOCSegmentation(str(voc), year="2012", image_set=split, download=False)
            except (RuntimeError, OSError, ValueError) as e:
                raise layout_error(task, root, f"VOC split {split!r}: {e}") from None
            items, missing = [], 0
            for img, mask in zip(ds.images, ds.masks):
                if Path(img).is_file() and Path(mask).is_file():
                    items.append((Path(img), Path(mask)))
                else:
                    missing += 1
            return Source("voc2012", split, items, len(VOC_CLASSES), list(VOC_CLASSES), seg_voc, missing)
        ade = _ade_root(root)
        if ade is not None:
            split = split or ("training" if train else "validation")
            img_dir = ade / "images" / split
            if not img_dir.is_dir():
                raise layout_error(task, root, f"no ADE20K split folder {img_dir}")
            images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
            items, missing = _paired(images, ade / "annotations" / split)
            return Source("ade20k", split, items, ADE_NUM_CLASSES, _ade_names(ade), seg_ade, missing)
        raise layout_error(task, root)
    if task in ("depth", "normal"):
        split = split or ("train" if train else "test")
        img_dir = root / split / "img"
        label_dir = root / split / ("depth" if task == "depth" else "norm")
        if not img_dir.is_dir() or not label_dir.is_dir():
            raise layout_error(task, root, f"missing {img_dir if not img_dir.is_dir() else label_dir}")
        images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        items, missing = _paired(images, label_dir)
        return Source("nyuv2", split, items, read_label=depth_mm_png if task == "depth" else normal_png,
                      missing_labels=missing)
    if task == "cls":
        split = split or ("train" if train else "val")
        folder = root / split
        if not folder.is_dir():
            raise layout_error(task, root, f"missing {folder}")
        from torchvision.datasets import ImageFolder

        try:
            ds = ImageFolder(str(folder), loader=lambda p: p)
        except (FileNotFoundError, RuntimeError) as e:
            raise layout_error(task, root, str(e).splitlines()[0]) from None
        return Source(root.name, split, [(Path(p), c) for p, c in ds.samples], len(ds.classes), list(ds.classes))
    raise ValueError(f"unknown task {task!r}")


def check_items(src: Source, task: str, root: Path, limit: int | None) -> Source:
    if limit:
        src.items = src.items[:limit]
    if not src.items:
        raise layout_error(task, root, f"split {src.split!r} has no usable items"
                           + (f" ({src.missing_labels} without a label file)" if src.missing_labels else ""))
    return src


# ---- torch datasets -----------------------------------------------------------------------------------

def _resize(t: torch.Tensor, size: tuple[int, int], nearest: bool) -> torch.Tensor:
    """(C, H, W) float -> (C, h, w): bilinear with antialiasing for images, nearest for labels."""
    if tuple(t.shape[-2:]) == tuple(size):
        return t
    if nearest:
        return F.interpolate(t[None], size=size, mode="nearest-exact")[0]
    return F.interpolate(t[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]


def eval_input_size(h: int, w: int, short: int, multiple: int) -> tuple[int, int]:
    """Aspect ratio kept, short side ``short``, both sides rounded to a multiple of ``multiple``."""
    s = short / min(h, w)
    return max(multiple, round(h * s / multiple) * multiple), max(multiple, round(w * s / multiple) * multiple)


def label_tensor(task: str, arr: np.ndarray) -> torch.Tensor:
    """numpy label -> (C, H, W) float32 (seg codes are exact in float32)."""
    t = torch.from_numpy(np.ascontiguousarray(arr)).float()
    return t.permute(2, 0, 1) if task == "normal" else t[None]


def target_from(task: str, t: torch.Tensor) -> torch.Tensor:
    """(C, H, W) float label -> the loss's target: seg int64 (H, W), depth (H, W), normal (3, H, W)."""
    if task == "seg":
        return t[0].round().long()
    return t[0] if task == "depth" else t


class DenseDataset(torch.utils.data.Dataset):
    """Segmentation / depth / normals. Training: random rescale, crop (padded with ignore / invalid),
    horizontal flip (normals' x negated). Evaluation: the whole image at ``eval_size`` short side,
    the label untouched at its own resolution."""

    def __init__(self, src: Source, task: str, train: bool, cfg, mean, std):
        self.src, self.task, self.train, self.cfg = src, task, train, cfg
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.pad_value = float(SEG_IGNORE) if task == "seg" else 0.0

    def __len__(self) -> int:
        return len(self.src.items)

    def _load(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img_path, lab_path = self.src.items[i]
        img = torch.tensor(read_rgb(img_path)).permute(2, 0, 1).float() / 255.0  # a copy: the decoded array is read-only
        lab = label_tensor(self.task, self.src.read_label(lab_path))
        if lab.shape[-2:] != img.shape[-2:]:
            raise DatasetError(f"{lab_path}: label {tuple(lab.shape[-2:])} and image {tuple(img.shape[-2:])} differ in size")
        return img, lab

    def __getitem__(self, key):
        if not self.train:
            img, lab = self._load(key)
            size = eval_input_size(*img.shape[-2:], self.cfg.eval_size or self.cfg.crop_size, self.cfg.size_multiple)
            img = (_resize(img, size, nearest=False) - self.mean) / self.std
            return {"image": img, "target": target_from(self.task, lab), "index": key}
        index, seed = key
        rng = random.Random(seed)
        img, lab = self._load(index)
        crop = self.cfg.crop_size
        h, w = img.shape[-2:]
        s = crop / min(h, w) * rng.uniform(*self.cfg.scale_range)
        size = (max(1, round(h * s)), max(1, round(w * s)))
        img, lab = _resize(img, size, nearest=False), _resize(lab, size, nearest=True)
        img = (img - self.mean) / self.std  # padding below is then the mean colour
        ph, pw = max(0, crop - size[0]), max(0, crop - size[1])
        if ph or pw:
            img = F.pad(img, (0, pw, 0, ph), value=0.0)
            lab = F.pad(lab, (0, pw, 0, ph), value=self.pad_value)
        y = rng.randint(0, img.shape[1] - crop)
        x = rng.randint(0, img.shape[2] - crop)
        img, lab = img[:, y:y + crop, x:x + crop], lab[:, y:y + crop, x:x + crop]
        if rng.random() < self.cfg.hflip:
            img, lab = img.flip(-1), lab.flip(-1)
            if self.task == "normal":
                lab = lab * torch.tensor([-1.0, 1.0, 1.0]).view(3, 1, 1)  # x follows the image columns
        return {"image": img.contiguous(), "target": target_from(self.task, lab.contiguous()), "index": index}


class ClassificationDataset(torch.utils.data.Dataset):
    """ImageFolder items through open_clip's transforms at the encoder's input size."""

    def __init__(self, src: Source, train: bool, image_size: int, mean, std):
        import open_clip

        self.src, self.train = src, train
        self.transform = open_clip.image_transform(image_size, is_train=train, mean=mean, std=std)

    def __len__(self) -> int:
        return len(self.src.items)

    def __getitem__(self, key):
        index, seed = key if self.train else (key, 0)
        path, label = self.src.items[index]
        try:
            img = open_image(Path(path).read_bytes())[0]
        except ValueError as e:
            raise DatasetError(f"{path}: unreadable image ({' '.join(map(str, e.args))})") from None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # torchvision's random transforms draw from the global generator
            x = self.transform(img)
        return {"image": x, "target": torch.tensor(label), "index": index}


def eigen_mask(h: int, w: int) -> torch.Tensor:
    """True inside Eigen et al.'s NYUv2 evaluation crop (only defined for 480x640 images)."""
    m = torch.zeros(h, w, dtype=torch.bool)
    if (h, w) == (480, 640):
        t, b, l, r = NYU_EIGEN_CROP
        m[t:b, l:r] = True
    else:
        m[:] = True
    return m
