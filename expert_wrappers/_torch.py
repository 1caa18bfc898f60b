"""What every torch expert shares: device placement, precision, batching and input checks."""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from .base import Expert

DEFAULT_SEED = 0


def output_sizes(images: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]] | None) -> list[tuple[int, int]]:
    """Each image's output map size: ``sizes`` (the label resolution the worker asks for) or the
    image's own size."""
    if sizes is None:
        return [tuple(im.shape[:2]) for im in images]
    sizes = [tuple(int(v) for v in s) for s in sizes]
    if len(sizes) != len(images) or any(len(s) != 2 or min(s) < 1 for s in sizes):
        raise ValueError(f"sizes must be one (H, W) per image, got {sizes!r} for {len(images)} images")
    return sizes


def resize_on_device(kind: str, t: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """A (H, W) map to ``hw`` where it was computed, as ``pipeline.labels.resize_map`` does on the
    host: class ids nearest (pixel centres, like PIL), continuous maps box-averaged over the same
    runs of pixels (``labels.box_starts``) when shrinking and bilinear when enlarging."""
    if tuple(t.shape[-2:]) == tuple(hw):
        return t
    import torch.nn.functional as F

    if kind == "seg":
        return F.interpolate(t[None, None], size=hw, mode="nearest-exact")[0, 0]
    if hw[0] <= t.shape[-2] and hw[1] <= t.shape[-1]:
        return _box_shrink(t.float(), hw)
    return F.interpolate(t[None, None].float(), size=hw, mode="bilinear", align_corners=False)[0, 0]


def _box_shrink(t: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """``labels.box_starts`` runs on the device, columns then rows. Each output sums a fixed number
    of gathered pixels (the longest run; shorter runs are padded with zeros), so the sum has one
    order on every device and run: no atomics (an ``index_add_`` on CUDA would make the labels
    differ in the last bit from run to run)."""
    from functools import partial

    from pipeline.labels import box_starts

    for axis, n_out in ((1, hw[1]), (0, hw[0])):
        n_in = t.shape[axis]
        starts = box_starts(n_in, n_out, partial(torch.arange, device=t.device))
        counts = starts[1:] - starts[:-1]
        offsets = torch.arange(-(-n_in // n_out) + 1, device=t.device)  # longest run: ceil(n_in / n_out) or one more
        idx = starts[:-1, None] + offsets  # (n_out, K)
        use = offsets < counts[:, None]
        picked = torch.where(use, t.movedim(axis, -1)[..., idx.clamp(max=n_in - 1)], 0.0)  # (..., n_out, K)
        t = (picked.sum(-1) / counts).movedim(-1, axis)
    return t


def check_images(images: Sequence[np.ndarray]) -> None:
    for i, img in enumerate(images):
        if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            shape = getattr(img, "shape", None)
            dtype = getattr(img, "dtype", type(img).__name__)
            raise ValueError(f"image {i}: expected an RGB uint8 array (H, W, 3), got {dtype} {shape}")
        if img.shape[0] < 1 or img.shape[1] < 1:
            raise ValueError(f"image {i} is empty: {img.shape}")


def shape_groups(shapes: Sequence[tuple[int, int]], max_batch: int) -> list[list[int]]:
    """Indices grouped by equal network-input shape, each group cut into batches of ``max_batch``.

    Experts whose output depends on padding (a ViT attends to it; align_corners upsampling shifts
    with it) batch only equal shapes, so an image's labels never depend on its batch neighbours.
    """
    groups: OrderedDict[tuple[int, int], list[int]] = OrderedDict()
    for i, s in enumerate(shapes):
        groups.setdefault(tuple(s), []).append(i)
    return [idx[k:k + max_batch] for idx in groups.values() for k in range(0, len(idx), max_batch)]


def chunks(n: int, size: int) -> Iterator[range]:
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


@contextlib.contextmanager
def seeded(seed: int = DEFAULT_SEED):
    """Seed model construction without disturbing the caller's global RNG stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def multiple_of(x: float, m: int = 32, lo: int | None = None) -> int:
    y = int(round(x / m) * m)
    return max(lo if lo is not None else m, y)


class TorchExpert(Expert):
    """Base for torch experts: inference mode always; on CUDA bf16 (fp16 where bf16 is not
    supported) autocast and channels_last; on CPU plain fp32, which is deterministic."""

    def __init__(self, device: str | torch.device = "cpu", max_batch: int = 8) -> None:
        super().__init__()
        self.device = torch.device(device)
        self.max_batch = int(max_batch)
        if self.max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.on_cuda = self.device.type == "cuda"
        self.amp_dtype = None
        if self.on_cuda:
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        # On a GPU the label codes are computed where the maps are (pipeline.labels_torch): the host
        # then only compresses and writes, and a map crosses the bus as uint16, not float32 (x3 for
        # normals). On a CPU the worker's encode pool does the same work off the expert's thread.
        self.device_codes = self.on_cuda

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.eval().requires_grad_(False).to(self.device)
        if self.on_cuda:
            model = model.to(memory_format=torch.channels_last)
        return model

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype)

    def to_device(self, img: np.ndarray) -> torch.Tensor:
        """uint8 (H, W, 3) -> uint8 (3, H, W) on the device; the float conversion happens there,
        so only a quarter of the bytes cross the bus."""
        if not img.flags.writeable:  # torch wants writable memory; decoded frames can be read-only
            img = img.copy()
        t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)
        return t.to(self.device, non_blocking=True)

    def emit(self, kind: str, t: torch.Tensor):
        """One output map: ``labels.Codes`` when ``device_codes`` is on, else a host numpy array."""
        if self.device_codes:
            from pipeline import labels_torch

            return labels_torch.to_codes(kind, t)
        return t.cpu().numpy()

    def channels_last(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.on_cuda else x.contiguous()

    def describe(self) -> dict:
        d = super().describe()
        d["device"] = str(self.device)
        d["precision"] = str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "float32"
        d["device_codes"] = self.device_codes
        return d
