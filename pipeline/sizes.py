"""Image sizes of a CC3M-like shard set, for warming experts up and for counting input shapes.

``make download`` fetches CC3M with img2dataset's ``resize_mode=keep_ratio, image_size=512,
resize_only_if_bigger``: the short side becomes 512 unless it was smaller, the aspect ratio stays.
Which aspect ratios CC3M's photos have is not measured here (no CC3M on this machine); the sizes
below are the common photo and web formats, and ``aspect_sweep`` covers every ratio in a range
for the shape counts in docs/PIPELINE.md.
"""
from __future__ import annotations

COMMON_ASPECTS = ((1, 1), (5, 4), (4, 3), (3, 2), (16, 10), (16, 9), (2, 1))  # width : height


def keep_ratio(hw: tuple[int, int], short: int = 512) -> tuple[int, int]:
    """img2dataset's keep_ratio resize (only if bigger): short side ``short``."""
    h, w = hw
    s = short / min(h, w)
    if s >= 1:
        return h, w
    return (short, round(w * s)) if h <= w else (round(h * s), short)


def cc3m_like_sizes(short: int = 512) -> tuple[tuple[int, int], ...]:
    """(h, w) of the common aspect ratios at short side ``short``, landscape and portrait."""
    out = []
    for w, h in COMMON_ASPECTS:
        land = (short, round(short * w / h))
        for hw in (land, land[::-1]):
            if hw not in out:
                out.append(hw)
    return tuple(out)


def aspect_sweep(short: int = 512, max_ratio: float = 3.0, step: int = 1) -> list[tuple[int, int]]:
    """Every (h, w) with short side ``short`` and long side up to ``max_ratio`` times it, in
    ``step``-pixel steps, both orientations."""
    out = []
    for long in range(short, int(short * max_ratio) + 1, step):
        out += [(short, long), (long, short)] if long != short else [(short, short)]
    return out
