"""What every torch expert shares: device placement, precision, batching and input checks."""
from __future__ import annotations

import contextlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence

import numpy as np
import torch

from .base import PRECISIONS, Expert

DEFAULT_SEED = 0
MEMORY_FORMATS = ("channels_last", "contiguous")
_MEMORY_FORMAT = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
# "auto" per task on CUDA; everywhere else "auto" is fp32. The GPU benchmark's G4 (labels of bf16
# autocast vs fp32 on the same images, H100) is what these defaults rest on (docs/EXPERTS.md): depth
# 0.16 % mean relative error and normals 0.03 deg median under bf16; seg kept 85 % of its pixels
# under bf16 and 95 % under tf32 (goal 99 %), so seg runs in plain fp32.
CUDA_DEFAULT_PRECISION = {"seg": "fp32", "depth": "bf16", "normal": "bf16"}


def resolve_precision(precision: str, device_type: str, task: str = "") -> str:
    """The precision an expert of ``task`` runs at on ``device_type``: bf16 / fp16 (autocast),
    fp32 (TF32 off for matmuls and cuDNN convolutions) or tf32 (float32 tensors, TF32 tensor-core
    maths). TF32 exists on CUDA only, so elsewhere it is fp32. A pure function of its arguments:
    the job's driver uses it to predict, before any worker starts, what workers will run."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return CUDA_DEFAULT_PRECISION.get(task, "bf16") if device_type == "cuda" else "fp32"
    if precision == "tf32" and device_type != "cuda":
        return "fp32"
    return precision


@contextlib.contextmanager
def float32_matmul_mode(tf32: bool):
    """TF32 on or off for CUDA matmuls and cuDNN convolutions inside the block (process-wide flags:
    two experts that want different modes must not run at the same time)."""
    mode = "tf32" if tf32 else "ieee"
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    if hasattr(matmul, "fp32_precision") and hasattr(conv, "fp32_precision"):  # torch >= 2.9
        old = (matmul.fp32_precision, conv.fp32_precision)
        matmul.fp32_precision = conv.fp32_precision = mode
        try:
            yield
        finally:
            matmul.fp32_precision, conv.fp32_precision = old
        return
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


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


def shape_groups(shapes: Sequence[Hashable], max_batch: int) -> list[list[int]]:
    """Indices grouped by equal network-input shape (any hashable key), each group cut into
    batches of ``max_batch``, groups in order of first appearance.

    Experts whose output depends on padding (a ViT attends to it; align_corners upsampling shifts
    with it) batch only equal shapes, so an image's labels never depend on its batch neighbours.
    """
    groups: OrderedDict[Hashable, list[int]] = OrderedDict()
    for i, s in enumerate(shapes):
        groups.setdefault(tuple(s) if isinstance(s, list) else s, []).append(i)
    return [idx[k:k + max_batch] for idx in groups.values() for k in range(0, len(idx), max_batch)]


def same_size_runs(sizes: Sequence[tuple[int, int]]) -> list[tuple[tuple[int, int], list[int]]]:
    """Positions grouped by equal output size (first appearance order): one resize per group."""
    groups: OrderedDict[tuple[int, int], list[int]] = OrderedDict()
    for j, hw in enumerate(sizes):
        groups.setdefault(tuple(hw), []).append(j)
    return list(groups.items())


def rows(t: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
    """``t[positions]`` (ascending positions) without an index tensor. A Python list as an index
    becomes a host tensor that torch copies to the device from pageable memory, which
    synchronises the stream: queuing a batch then waited for the forward just queued, and the GPU
    idled while the host prepared the next batch (H100, bench G1: 1.5 such waits per batch of
    depth maps, wrapper / bare 0.62). Slices and one ``cat`` queue without waiting."""
    positions = list(positions)
    first, last = positions[0], positions[-1]
    if positions == list(range(first, last + 1)):
        return t if (first, last + 1) == (0, t.shape[0]) else t[first:last + 1]
    return torch.cat([t[j:j + 1] for j in positions])


def fixed_input_shapes(shapes, multiple: int) -> tuple[tuple[int, int], ...] | None:
    """Validates an expert's ``input_shapes`` option: (h, w) pairs, multiples of ``multiple``."""
    if shapes is None:
        return None
    out = tuple((int(h), int(w)) for h, w in shapes)
    if not out or any(h < multiple or w < multiple or h % multiple or w % multiple for h, w in out):
        raise ValueError(f"input_shapes must be (h, w) pairs, multiples of {multiple}, got {shapes!r}")
    return out


def fixed_input_shape(image_hw: tuple[int, int], shapes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The shape of ``shapes`` whose aspect ratio is nearest the image's (in log ratio; ties: the
    first listed). The image is squashed to it, as the official NLL-AngMF demo squashes every
    image to 640x480: fewer distinct shapes for a slightly distorted input."""
    ar = math.log(image_hw[1] / image_hw[0])
    return min(shapes, key=lambda s: abs(math.log(s[1] / s[0]) - ar))


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


class UploadRing:
    """Host-to-device copies of uint8 arrays that never block the host: each call gathers its
    arrays into one buffer of a small ring of reused staging buffers (pinned on CUDA) and queues
    one non-blocking copy; an event marks when the copy has read the buffer, and a buffer is
    written again only after its event (by then long passed: the ring holds ``slots`` batches).

    A copy from pageable memory is not an option on the hot path: the CUDA runtime stages it
    through its own buffer and torch then synchronises the stream, so the host waits for every
    kernel queued before the copy. Pinning each image separately (torch's ``pin_memory()``) was
    measured slower than that on an H100 (bench G2, run 1). Buffers grow to the largest batch seen
    (rounded up to a power of two), so a worker allocates a few, once."""

    def __init__(self, device: torch.device, slots: int = 3):
        self.device = torch.device(device)
        self.pin = self.device.type == "cuda"
        self.slots: list[list] = [[None, None] for _ in range(max(1, slots))]  # [buffer, event]
        self.next = 0
        self.allocations = 0

    def upload(self, arrays: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """uint8 arrays -> uint8 tensors of the same shapes on the device, views of one copy."""
        sizes = [int(a.size) for a in arrays]
        for a in arrays:
            if a.dtype != np.uint8:
                raise TypeError(f"UploadRing: uint8 arrays only, got {a.dtype}")
        slot = self.slots[self.next]
        self.next = (self.next + 1) % len(self.slots)
        buf, event = slot
        if event is not None:
            event.synchronize()  # the copy that last read this buffer
        total = max(1, sum(sizes))
        if buf is None or buf.numel() < total:
            buf = torch.empty(1 << (total - 1).bit_length(), dtype=torch.uint8, pin_memory=self.pin)
            slot[0] = buf
            self.allocations += 1
        host = buf.numpy()
        start = 0
        for a, n in zip(arrays, sizes):
            np.copyto(host[start:start + n].reshape(a.shape), a)
            start += n
        dev = buf[:total].to(self.device, non_blocking=self.pin)
        if self.device.type == "cuda":
            slot[1] = torch.cuda.Event()
            slot[1].record(torch.cuda.current_stream(self.device))
        elif dev.data_ptr() == buf.data_ptr():  # a CPU "device": the buffer is reused, so copy out
            dev = dev.clone()
        out, start = [], 0
        for a, n in zip(arrays, sizes):
            out.append(dev[start:start + n].view(a.shape))
            start += n
        return out


class TorchExpert(Expert):
    """Base for torch experts: inference mode always; on CUDA, by default, the precision G4 chose
    per task (bf16 autocast in channels_last, or fp32 in NCHW) and CUDA-graph replays; on CPU plain
    fp32, which is deterministic.

    Common options (every torch expert's ``build`` accepts them):

    - ``max_batch``: images per forward.
    - ``precision``: ``auto`` | ``bf16`` | ``fp16`` | ``fp32`` | ``tf32`` (``resolve_precision``).
    - ``pad_batches``: fill a partial batch up to ``max_batch`` with copies of its last image,
      whose outputs are dropped, so every forward has the same batch size: the GPU meets one
      (batch, shape) pair per input shape, and labels do not depend on how many neighbours an
      image had (on CPU a batch of 1 can take another kernel than a batch of 2). Default: on CUDA.
    - ``pin_memory``: how a batch's images reach a CUDA device. On (the default on CUDA): the
      batch's bytes are gathered into one of a few reused pinned buffers (``UploadRing``) and
      copied in one transfer that does not block the host. Off: one copy per image from the
      image's own (pageable) memory; such a copy synchronises the stream, so queuing a batch
      waits until every batch queued before it has run, and the GPU then idles while the host
      prepares the next one (the deferred hand-over of ``pipeline.worker`` relies on not
      waiting). The bench's G1/G2 variants measure both. Asked for on a CPU, the same ring runs
      unpinned (so CPU tests cover it); the CPU default is off (the tensors then share the images'
      memory, no copy at all).
    - ``memory_format``: ``channels_last`` (default on CUDA under bf16/fp16 autocast: tensor-core
      convolutions want NHWC) or ``contiguous`` (NCHW; the default on CPU and for fp32/tf32).
    - ``cuda_graphs``: replay each (batch, input shape)'s forward from a CUDA graph captured at its
      first use (``run_forward``). Default: on for CUDA. Queuing DPT-large's ~1150 ops for one batch
      of 8 took the host 15 ms against 18 ms of GPU work (NLL-AngMF: 39 vs 47 ms; H100), so with the
      worker's own host work the GPU waited for the host; a replay is queued in 0.2 ms and gives the
      same outputs bit for bit (measured: max difference 0). Experts whose forward is not one
      fixed-shape tensor program (Mask R-CNN) do not use it.
    - ``device_codes``: hand over ``labels.Codes`` made on the device (set after construction).

    Subclasses that batch by network input shape implement ``batch_key`` (the input shape),
    ``preprocess``, ``forward`` and ``postprocess`` and inherit ``predict``.
    """

    def __init__(self, device: str | torch.device = "cpu", max_batch: int = 8, precision: str = "auto",
                 pad_batches: bool | None = None, pin_memory: bool | None = None,
                 memory_format: str | None = None, cuda_graphs: bool | None = None) -> None:
        super().__init__()
        self.device = torch.device(device)
        self.max_batch = int(max_batch)
        if self.max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.on_cuda = self.device.type == "cuda"
        self.set_precision(precision)
        self.pad_batches = self.on_cuda if pad_batches is None else bool(pad_batches)
        if memory_format not in (None,) + MEMORY_FORMATS:
            raise ValueError(f"memory_format must be one of {MEMORY_FORMATS}, got {memory_format!r}")
        # NHWC feeds bf16 tensor cores; plain fp32 convolutions ran faster in NCHW (H100, bench G1:
        # Mask R-CNN 32.8 vs 35.9 ms per image)
        self.memory_format = memory_format or (
            "channels_last" if self.on_cuda and self.amp_dtype is not None else "contiguous")
        self.cuda_graphs = self.on_cuda if cuda_graphs is None else bool(cuda_graphs) and self.on_cuda
        self._graphs: dict = {}  # (input shape, strides, dtype, precision) -> (graph, input, output) | error
        self._graph_pool = None
        self._capturing = False
        self.pin_memory = self.on_cuda if pin_memory is None else bool(pin_memory)
        self._uploads = UploadRing(self.device) if self.pin_memory else None  # on a CPU: unpinned (tests)
        # On a GPU the label codes are computed where the maps are (pipeline.labels_torch): the host
        # then only compresses and writes, and a map crosses the bus as 2 bytes per pixel, not 4
        # (12 for normals). On a CPU the worker's encode pool does the same work off the expert's thread.
        self.device_codes = self.on_cuda

    def set_precision(self, precision: str) -> None:
        """``precision`` as the constructor takes it (the benchmark compares precisions on one
        model)."""
        resolved = resolve_precision(precision, self.device.type, self.task)
        if resolved == "bf16" and self.on_cuda and not torch.cuda.is_bf16_supported():
            raise ValueError(f"{self.task} expert: this GPU has no bf16; pass precision fp16, tf32 or fp32 "
                             f"(CLI: --precision {self.task}=fp16)")
        self.precision_option, self.precision = precision, resolved
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolved)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.eval().requires_grad_(False).to(self.device)
        return model.to(memory_format=_MEMORY_FORMAT[self.memory_format])

    def set_memory_format(self, memory_format: str) -> None:
        """``memory_format`` as the constructor takes it, applied to the loaded model (the GPU
        benchmark compares both on one model)."""
        if memory_format not in MEMORY_FORMATS:
            raise ValueError(f"memory_format must be one of {MEMORY_FORMATS}, got {memory_format!r}")
        self.memory_format = memory_format
        self.model = self.model.to(memory_format=_MEMORY_FORMAT[memory_format])

    def autocast(self):
        """The precision context of a forward pass (while a CUDA graph is captured, without
        autocast's weight cache, which a graph cannot hold)."""
        if self.amp_dtype is not None:
            return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype,
                                  cache_enabled=not self._capturing)
        if self.on_cuda:
            return float32_matmul_mode(tf32=self.precision == "tf32")
        return contextlib.nullcontext()

    def to_device_many(self, images: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """uint8 (H, W, 3) images -> contiguous uint8 (3, H, W) tensors on the device; the float
        conversion happens there, so only a quarter of the bytes cross the bus. With
        ``pin_memory`` one non-blocking transfer through the upload ring, else one (synchronising)
        copy per image. Each image is made NCHW where it lands: on a GPU, resizing and concatenating NHWC-strided images cost 4.4 ms per batch of 8
        against 1.1 (H100); the values are the same either way."""
        if self.pin_memory:
            if self._uploads is None:  # switched on after construction
                self._uploads = UploadRing(self.device)
            hwc = self._uploads.upload(images)
        else:
            hwc = [torch.from_numpy(np.ascontiguousarray(img) if img.flags.writeable else img.copy()).to(self.device)
                   for img in images]  # torch wants writable memory; decoded frames can be read-only
        return [t.permute(2, 0, 1).contiguous() for t in hwc]

    def padded(self, x: torch.Tensor) -> torch.Tensor:
        """A partial batch filled up to ``max_batch`` with its last image (see ``pad_batches``)."""
        n = x.shape[0]
        if not self.pad_batches or n >= self.max_batch:
            return x
        return torch.cat([x, x[-1:].expand(self.max_batch - n, *x.shape[1:])])

    def start_emit(self, entries: Sequence[tuple[str, torch.Tensor, Sequence[int]]]) -> Callable[[list[dict]], None]:
        """``(kind, maps (B, H, W[, 3]), image indices)`` -> ``out[index][kind]``: ``labels.Codes``
        (``device_codes``) or host arrays, in two steps: the conversion and one copy of every entry
        to the host are queued on the device now; the returned function waits for them and fills
        ``out``."""
        from pipeline import labels_torch

        if self.device_codes:
            pending = labels_torch.to_codes_many_deferred([(kind, t) for kind, t, _ in entries])
        else:
            pending = labels_torch.to_host_deferred([t for _, t, _ in entries])
        targets = [(kind, ids) for kind, _, ids in entries]

        def finish(out: list[dict]) -> None:
            for (kind, ids), values in zip(targets, pending()):
                for j, i in enumerate(ids):
                    out[i][kind] = values[j]
        return finish

    def in_memory_format(self, x: torch.Tensor) -> torch.Tensor:
        """A network input in the model's memory format."""
        return x.contiguous(memory_format=_MEMORY_FORMAT[self.memory_format])

    # -- batching by network input shape ---------------------------------------------------------

    def batch_key(self, image_hw: tuple[int, int]) -> Hashable:
        """Images with equal keys can share a forward (the worker buckets by it). None: any."""
        return None

    def preprocess(self, images: list[np.ndarray], key) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def postprocess(self, y: torch.Tensor, hw: tuple[int, int]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def predict(self, images: list[np.ndarray], sizes=None) -> list[dict]:
        """Groups of equal ``batch_key`` -> ``predict_batch`` each -> one host hand-over per batch."""
        return self.predict_deferred(images, sizes)()

    def predict_deferred(self, images: list[np.ndarray], sizes=None) -> Callable[[], list[dict]]:
        """``predict`` in two steps: the device work (and the copy of its results to the host) is
        queued now; the returned function waits for it and returns what ``predict`` returns. A
        caller that queues its next batch before finishing this one keeps the GPU busy while the
        host finishes (the worker does: ``pipeline.worker._Lane``). On a CPU everything runs now."""
        check_images(images)
        out_hw = output_sizes(images, sizes)
        keys = [self.batch_key(im.shape[:2]) for im in images]
        res: list[dict] = [{} for _ in images]
        pending = []
        with torch.inference_mode():
            for idx in shape_groups(keys, self.max_batch):
                maps = self.predict_batch([images[i] for i in idx], [out_hw[i] for i in idx], keys[idx[0]],
                                          [res[i] for i in idx])
                pending.append(self.start_emit([(kind, t, [idx[j] for j in pos]) for kind, t, pos in maps]))

        def finish() -> list[dict]:
            for fill in pending:
                fill(res)
            return res
        return finish

    def predict_batch(self, images: list[np.ndarray], sizes: list[tuple[int, int]], key, out: list[dict]
                      ) -> list[tuple[str, torch.Tensor, list[int]]]:
        """One batch of equal ``key``: preprocess -> forward (padded) -> postprocess per output size.
        Returns ``(kind, maps (b, H, W[, 3]), positions in the batch)`` for the device maps; host
        values go straight into ``out`` (one dict per image)."""
        y = self.run_forward(self.in_memory_format(self.padded(self.preprocess(images, key))))[:len(images)]
        entries = []
        for hw, pos in same_size_runs(sizes):
            part = rows(y, pos)
            entries += [(kind, t, pos) for kind, t in self.postprocess(part, hw).items()]
        return entries

    def run_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``forward(x)``; with ``cuda_graphs``, replayed from the graph captured for ``x``'s shape,
        layout, dtype and precision (captured now if new; a shape whose capture failed runs
        eagerly from then on, and the error is in ``describe()``)."""
        if not self.cuda_graphs:
            return self.forward(x)
        key = (tuple(x.shape), x.stride(), x.dtype, self.precision)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(x)
        if isinstance(entry, str):
            return self.forward(x)
        graph, static_x, static_y = entry
        static_x.copy_(x)
        graph.replay()
        return static_y.clone()  # the next replay overwrites static_y; the clone is queued before it

    def _capture(self, x: torch.Tensor):
        """(graph, its input, its output) for inputs like ``x``, or the error text. Every graph of
        this expert shares one memory pool: they replay one at a time on one stream."""
        try:
            static_x = x.clone(memory_format=torch.preserve_format)
            stream = torch.cuda.current_stream(self.device)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(stream)
            self._capturing = True
            with torch.cuda.stream(side):  # cuDNN / cuBLAS set-up runs outside the capture
                for _ in range(2):
                    self.forward(static_x)
            stream.wait_stream(side)
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._graph_pool):
                static_y = self.forward(static_x)
            return graph, static_x, static_y
        except Exception as e:  # noqa: BLE001 - that shape runs eagerly
            return f"{type(e).__name__}: {e}"[:300]
        finally:
            self._capturing = False

    def warm_up(self, image_sizes: Sequence[tuple[int, int]]) -> dict:
        """Run one full batch of each distinct input shape these image sizes map to, so that the
        first real batches do not pay the device's per-shape set-up (cuDNN picks, and for fused
        engines compiles, kernels per shape). Returns {"shapes": n, "seconds": s}."""
        t0 = time.perf_counter()
        seen: dict = {}
        for hw in image_sizes:
            seen.setdefault(self.batch_key(tuple(hw)), tuple(hw))
        for hw in seen.values():
            img = np.zeros(tuple(hw) + (3,), np.uint8)
            self.predict([img] * self.max_batch)
        if self.on_cuda:
            torch.cuda.synchronize(self.device)
        return {"shapes": len(seen), "seconds": round(time.perf_counter() - t0, 3)}

    def describe(self) -> dict:
        d = super().describe()
        d["device"] = str(self.device)
        d["precision"] = self.precision
        d["device_codes"] = self.device_codes
        d["max_batch"] = self.max_batch
        d["pad_batches"] = self.pad_batches
        d["memory_format"] = self.memory_format
        d["cuda_graphs"] = self.cuda_graphs
        if self._graphs:
            d["graphs"] = {"captured": sum(not isinstance(g, str) for g in self._graphs.values()),
                           "failed": sorted({g for g in self._graphs.values() if isinstance(g, str)})}
        return d

    def label_settings(self, device_type: str | None = None) -> dict:
        """The settings that change this expert's labels beyond the last bits (recorded in the
        manifest and in the job's resume fingerprint): as it runs now, or as the same options
        would run on ``device_type`` with the default ``device_codes`` (the job's driver builds
        experts on CPU and predicts what GPU workers will run)."""
        if device_type is None:
            return {"precision": self.precision, "device_codes": self.device_codes}
        return {"precision": resolve_precision(self.precision_option, device_type, self.task),
                "device_codes": device_type == "cuda"}
