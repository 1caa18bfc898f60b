"""COCO 'thing' class names in the contiguous order of the seg labels, and the seg palette.

Seg label value ``i`` in 1..80 is ``COCO_CLASSES[i - 1]``; 0 is background and 255 is ignore
(``pipeline.labels``). The order is the usual detectron2 / torchvision order of the 80 COCO
categories with the gaps of the original 1..90 ids removed.
"""
from __future__ import annotations

import numpy as np

from pipeline.labels import SEG_IGNORE

COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)
assert len(COCO_CLASSES) == 80

# The 20 PASCAL VOC classes under their COCO names (the paper's Fig. 2a plots these).
VOC_IN_COCO = (
    "airplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "dining table", "dog", "horse", "motorcycle", "person", "potted plant", "sheep", "couch",
    "train", "tv",
)


def class_name(label: int) -> str:
    """Name of a seg label value (0 background, 1..80 COCO, 255 ignore)."""
    if label == 0:
        return "background"
    if label == SEG_IGNORE:
        return "ignore"
    if 1 <= label <= 80:
        return COCO_CLASSES[label - 1]
    return f"class_{label}"


def palette() -> np.ndarray:
    """256 RGB colours for seg maps (preview overlays, exported palette PNGs): 0 black (background),
    255 grey (ignore), classes well spread in hue."""
    import colorsys

    pal = np.zeros((256, 3), np.uint8)
    for c in range(1, 255):
        h = (c * 0.618033988749895) % 1.0
        r, g, b = colorsys.hsv_to_rgb(h, 0.75, 0.95 if c % 2 else 0.75)
        pal[c] = (int(r * 255), int(g * 255), int(b * 255))
    pal[SEG_IGNORE] = (128, 128, 128)
    return pal
