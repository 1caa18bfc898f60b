"""Streaming training data: img2dataset shards joined by key with the selected label trees.

Shards and labels are locations (``pipeline.storage``): local paths or URLs (``s3://…``,
``gs://…``). A source shard is streamed; a label tar on a bucket is first copied whole to the local
scratch folder (``$CLIPTEX_SCRATCH``, else ``$TMPDIR``) and removed after its shard, because the
strict join reads members by offset.

Pipeline of one (rank, stream) — a stream is what one DataLoader worker reads:

    chunk c: K shards (drawn with replacement in resampled mode, else an epoch-shuffled split of the
             shards by rank and stream) read by webdataset and interleaved
      -> per shard: strict join with <labels>/<task>/<shard>.tar by key (``cliptex_labels.join_shard``,
         the project's one reader of label tars: a missing, repeated or extra key is skipped and
         counted; nothing is zipped by position)
      -> webdataset shuffle buffer (seeded by seed/rank/stream/chunk)
      -> variable-resolution batches: step s has shape (h, w, batch) drawn by corenet's rule from a
         seed shared by all ranks, so every rank sees the same batch size (the global contrastive
         loss all-gathers equal-sized tensors) and the stream never ends (no DDP hang)
      -> decode + the same geometric augmentation on image and labels + tokenised caption

Everything random is a pure function of (seed, rank, stream, chunk or step), and a batch carries
its stream position (chunk, items consumed in it). Checkpoints store these positions, so a resumed
run rebuilds the chunk, skips the consumed items without decoding them and produces exactly the
batches the uninterrupted run would have produced.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import random
import tarfile
import time
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from cliptex_labels import reader as LR
from cliptex_labels.images import IMAGE_EXTS, open_image
from pipeline import labels as L
from pipeline import storage

log = logging.getLogger(__name__)

# the kind the trainer reads from each tree: the task's own map (kappa is added for the
# kappa-weighted normal loss)
TASK_KINDS = {t: [L.kinds_of(t)[0]] for t in L.TASKS}
# what the skip counters count (per reason): "samples_skipped" = source samples not used, each once;
# the rest are the reader's reasons (cliptex_labels.reader.join_reasons)
REASONS = ("samples_skipped", *LR.join_reasons(L.TASKS))
R = {r: i for i, r in enumerate(REASONS)}
MAX_CONSECUTIVE_SKIPS = 5000


class DataError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------------
# shard sets


def resolve_shards(spec: str) -> tuple[str, list[str], int | None, str | None]:
    """``spec`` is a manifest name/yaml (manifests/<name>.yaml), a folder / prefix of .tar shards or
    a brace pattern, local or a URL (``pipeline.manifest.shard_set``). Returns (name, shard
    locations, expected samples or None, the manifest's label output or None)."""
    from pipeline.manifest import shard_set

    ss = shard_set(spec)
    return ss.name, list(ss.shards), ss.expected_samples, ss.output


def _shard_count(shard: str) -> int | None:
    """Samples in a shard as img2dataset recorded them (``<shard>_stats.json`` beside it), or by
    counting its image members (the shard streamed once); None if neither can be read."""
    stats = storage.join(storage.parent(shard), f"{storage.stem(shard)}_stats.json")
    try:
        n = json.loads(storage.read_bytes(stats)).get("successes")
        if isinstance(n, int) and n >= 0:
            return n
    except (OSError, ValueError, AttributeError):
        pass
    try:
        with storage.open_read(shard) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            return sum(1 for m in tar if m.name.rpartition(".")[2].lower() in IMAGE_EXTS)
    except (tarfile.TarError, OSError):
        return None


def count_samples(shards: list, limit: int = 64) -> int:
    """Number of samples of the shards (counted on up to ``limit`` shards, extrapolated)."""
    counted = sum(_shard_count(s) or 0 for s in shards[:limit])
    return round(counted * len(shards) / max(1, min(limit, len(shards))))


def label_files(label_root, tasks: list[str], shards: list) -> tuple[list[str], dict, list[str]]:
    """Keep the shards whose label tars exist for every selected task (one listing per task tree).
    Returns (shards, {task: [tar per shard]}, excluded shard names)."""
    shards = [storage.normalize(s) for s in shards]
    if not tasks:
        return shards, {}, []
    hint = "run `make pseudolabel` first or train the CLIP-FT baseline with --tasks none"
    if label_root is None:
        raise DataError(f"no label folder given (--labels) and the shards come without a manifest; {hint}")
    root = storage.normalize(label_root)
    if storage.is_local(root) and not os.path.isdir(root):
        raise DataError(f"label folder {root} does not exist; {hint}")
    trees: dict[str, set[str]] = {}
    for t in tasks:
        try:
            trees[t] = set(storage.listdir(storage.join(root, t)))
        except OSError as e:
            raise storage.error("read", root, e) from e
    if not any(trees.values()):
        raise DataError(f"no label trees under {storage.redact(root)}; {hint}")
    for t in tasks:
        if not trees[t]:
            raise DataError(f"no {t!r} label tree under {storage.redact(root)} (expected "
                            f"{storage.redact(storage.join(root, t))}/<shard>.tar); drop the task with --tasks "
                            f"or make the labels")
    tar = {t: {s: storage.join(root, t, storage.basename(s)) for s in shards} for t in tasks}
    keep, excluded = [], []
    for s in shards:
        (keep if all(tar[t][s] in trees[t] for t in tasks) else excluded).append(s)
    if not keep:
        raise DataError(f"none of the {len(shards)} shards has label tars for all of {tasks} under "
                        f"{storage.redact(root)}")
    return keep, {t: [tar[t][s] for s in keep] for t in tasks}, [storage.basename(s) for s in excluded]


# ------------------------------------------------------------------------------------------------
# corenet-style variable batch shapes


def _make_divisible(v: float, d: int) -> int:
    new = max(d, int(v + d / 2) // d * d)
    return new + d if new < 0.9 * v else new


def image_batch_pairs(base: int, lo: int, hi: int, n: int, multiple: int, batch: int) -> list[tuple[int, int, int]]:
    """corenet's ``image_batch_pairs`` (square sizes): sizes linspace(lo, hi, n) plus the base, each a
    multiple of ``multiple``; batch = floor(base^2 * batch / size^2), at least 1. Sorted (h, w, batch)."""
    sizes = sorted({_make_divisible(v, multiple) for v in list(np.linspace(lo, hi, n)) + [base]})
    return sorted({(s, s, max(1, int(base * base * batch / (s * s)))) for s in sizes})


def step_shape(pairs: list, seed: int, step: int) -> tuple[int, int, int]:
    """The (h, w, batch) of a step: the same on every rank (a seed shared by all)."""
    return random.Random(f"{seed}/shape/{step}").choice(pairs)


# ------------------------------------------------------------------------------------------------
# reading and joining by key


def _skip(reason: str) -> tuple:
    return ("__skip__", reason)


def join_shard(source: str, label_tars: dict[str, str], kinds: dict[str, list[str]]) -> Iterator[dict | tuple]:
    """Yield, in source order, records ``{"key", "img", "txt", "labels": {task: {kind: bytes}}}`` of
    source samples that have every selected label kind, and ``("__skip__", reason)`` for everything
    that could not be used (counted by the batcher; a source sample not used also counts once under
    "samples_skipped"). The join itself is ``cliptex_labels.join_shard``, on the source streamed
    and the label tars as local files (remote ones copied to scratch for the shard)."""
    with contextlib.ExitStack() as stack:
        # a location that cannot be opened goes to the reader as is: it reports it as damage
        # (an unreadable source or label tar), as it does for a missing local file
        stream = _enter_or(stack, storage.open_read, source)
        local = {t: _enter_or(stack, storage.local_copy, p) for t, p in label_tars.items()}
        yield from _joined(stream, local, kinds)


def _enter_or(stack: contextlib.ExitStack, opener, location: str):
    try:
        return stack.enter_context(opener(location))
    except OSError:
        return location


def _joined(source, label_tars: dict, kinds: dict) -> Iterator[dict | tuple]:
    for item in LR.join_shard(source, label_tars, kinds):
        if isinstance(item, LR.Joined):
            ext = next((e for e in IMAGE_EXTS if e in item.members), None)
            yield {"key": item.key, "img": item.members[ext] if ext else None, "txt": item.members.get("txt"),
                   "labels": item.labels}
            continue
        yield _skip(item.reason)
        if item.key is not None and not item.reason.startswith("extra_"):
            yield _skip("samples_skipped")


def _roundrobin(iters: list[Iterator]) -> Iterator:
    iters = list(iters)
    while iters:
        for it in list(iters):
            try:
                yield next(it)
            except StopIteration:
                iters.remove(it)


# ------------------------------------------------------------------------------------------------
# decoding and augmentation


class SampleError(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def rrc_box(H: int, W: int, out_h: int, out_w: int, scale, ratio, rng: random.Random) -> tuple:
    """torchvision's RandomResizedCrop parameters, as a float box (left, top, right, bottom), with the
    aspect-ratio range centred on the output's aspect."""
    area, target = H * W, out_w / out_h
    lo, hi = math.log(ratio[0] * target), math.log(ratio[1] * target)
    for _ in range(10):
        a = area * rng.uniform(scale[0], scale[1])
        r = math.exp(rng.uniform(lo, hi))
        w, h = math.sqrt(a * r), math.sqrt(a / r)
        if 0 < w <= W and 0 < h <= H:
            left, top = rng.uniform(0, W - w), rng.uniform(0, H - h)
            return (left, top, left + w, top + h)
    # fallback: the largest centred crop with the output's aspect
    if W / H > target:
        w, h = H * target, H
    else:
        w, h = W, W / target
    left, top = (W - w) / 2, (H - h) / 2
    return (left, top, left + w, top + h)


def nearest_index(lo: float, hi: float, n_out: int, n_in: int, reverse: bool = False) -> np.ndarray:
    """Source indices of a nearest-neighbour resample of [lo, hi) to ``n_out`` samples (PIL's NEAREST
    rule: the pixel under each output pixel's centre), optionally reversed (a horizontal flip)."""
    pos = _centres(n_out) * ((hi - lo) / n_out)
    pos += lo
    # truncation equals floor for positions >= 0, and anything below 0 becomes 0 either way
    idx = pos.astype(np.intp)
    np.maximum(idx, 0, out=idx)
    np.minimum(idx, n_in - 1, out=idx)
    return idx[::-1] if reverse else idx


@functools.lru_cache(maxsize=64)
def _centres(n: int) -> np.ndarray:
    c = np.arange(n) + 0.5
    c.flags.writeable = False
    return c


def load_sample(rec: dict, h: int, w: int, lh: int, lw: int, rng: random.Random, kinds: dict,
                crop_scale=(0.5, 1.0), crop_ratio=(0.75, 4 / 3), hflip: float = 0.5,
                out: dict[str, np.ndarray] | None = None, as_codes: bool = False) -> dict:
    """Decode one joined record and apply one random resized crop + flip to the image and its labels
    (crop coordinates scaled to each label's resolution; a flip negates the normals' x). The image is
    resampled bilinearly; every label map with nearest neighbour: class ids stay ids, normals stay unit
    vectors, and no depth or normal is blended across an object boundary. With ``out`` (a slot per
    array of a preallocated batch) the arrays are written there instead of newly allocated.

    ``as_codes``: continuous labels stay in their stored uint16 form (quantised depth/confidence with
    ``<kind>_lo``/``<kind>_scale``, octahedral normal codes) — a quarter to a sixth of the float bytes
    through the DataLoader's shared memory; ``labels_to_values`` converts them on the device."""
    if rec["img"] is None:
        raise SampleError("missing_image")
    try:
        img = open_image(rec["img"])[0]
    except ValueError as e:
        raise SampleError(e.args[0]) from None
    if rec["txt"] is None:
        raise SampleError("missing_caption")
    try:
        caption = rec["txt"].decode("utf-8").strip()
    except UnicodeDecodeError:
        caption = ""
    if not caption:
        raise SampleError("invalid_caption")
    W, H = img.size
    box = rrc_box(H, W, h, w, crop_scale, crop_ratio, rng)
    flip = rng.random() < hflip
    res = {"caption": caption}
    image = np.asarray(img.resize((w, h), Image.BILINEAR, box=box))
    image = image[:, ::-1] if flip else image
    if out is not None:
        np.copyto(out["image"], image)
        image = out["image"]
    res["image"] = image
    # per label resolution: the window of the map the crop reads, and the nearest-neighbour indices
    # into it (every map of the sample at that resolution shares them)
    geometry: dict[tuple[int, int], tuple[slice, slice, np.ndarray, np.ndarray, bool]] = {}
    for task, members in rec["labels"].items():
        for kind in kinds[task]:
            try:
                header, payload = L.read_header(members[kind])
            except L.LabelFormatError:
                raise SampleError(f"bad_{task}") from None
            if header["kind"] != kind or tuple(header.get("image_size", ())) != (H, W):
                raise SampleError(f"bad_{task}")  # a label made for another image
            lH, lW = (int(n) for n in header["shape"])
            g = geometry.get((lH, lW))
            if g is None:
                sx, sy = lW / W, lH / H  # the crop box in this label's pixels
                rows = nearest_index(box[1] * sy, box[3] * sy, lh, lH)
                cols = nearest_index(box[0] * sx, box[2] * sx, lw, lW, reverse=flip)
                r0, r1 = int(rows[0]), int(rows[-1]) + 1  # rows ascend; cols may be reversed
                c0, c1 = sorted((int(cols[0]), int(cols[-1])))
                # the element-wise column gather costs most: run it on the fewer rows (the window's
                # when the crop is upsampled), and copy whole rows in the other gather
                g = geometry[lH, lW] = (slice(r0, r1), slice(c0, c1 + 1), rows - r0, cols - c0, r1 - r0 < lh)
            win_rows, win_cols, rows, cols, cols_first = g
            try:
                # crop the stored codes, then convert only the kept pixels (nearest commutes with it)
                codes = L.decode_payload(header, payload, win_rows, win_cols)
            except L.LabelFormatError:
                raise SampleError(f"bad_{task}") from None
            codec = header["codec"]
            keep_codes = as_codes or codec == "u8"
            slot = out[kind] if out is not None and keep_codes and out[kind].dtype == codes.dtype else None
            # indices are inside the window by construction: "clip" lets take write straight into the
            # batch slot (the default mode buffers its output)
            if cols_first:
                y = codes.take(cols, axis=1, mode="clip").take(rows, axis=0, out=slot, mode="clip")
            else:
                y = codes.take(rows, axis=0, mode="clip").take(cols, axis=1, out=slot, mode="clip")
            if kind == "normal" and flip:
                y ^= np.uint16(255)  # mirrored image: u -> 255 - u is the octahedral code of (-x, y, z)
            if keep_codes:
                if codec.startswith("u16q"):
                    res[f"{kind}_lo"], res[f"{kind}_scale"] = L.quantisation(header)
            else:
                y = L.values_from_codes(header, y)
            if out is not None and y is not out[kind]:
                np.copyto(out[kind], y)
                y = out[kind]
            res[kind] = y
    return res


# ------------------------------------------------------------------------------------------------
# the stream


_TORCH_DTYPES = {np.dtype(np.uint8): torch.uint8, np.dtype(np.uint16): torch.uint16,
                 np.dtype(np.float32): torch.float32}


def _one_block(specs: dict[str, tuple[tuple[int, ...], type]]) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray]]:
    """Tensors of the given (shape, numpy dtype) that are views of one uint8 block, and numpy views of
    the same memory. A DataLoader worker hands every tensor storage over separately (a shared-memory
    segment and a file descriptor passed through a socket: about 0.15 ms of worker CPU each, measured
    here); views of one storage go as one."""
    offsets, total = {}, 0
    for name, (shape, dtype) in specs.items():
        offsets[name] = total
        total += -(-math.prod(shape) * np.dtype(dtype).itemsize // 64) * 64  # aligned for any view dtype
    if torch.utils.data.get_worker_info() is not None:
        # in a DataLoader worker, straight into shared memory (as torch's default_collate does): the
        # samples fault its pages in once, and handing it over copies nothing
        block = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(total))
    else:
        block = torch.empty(total, dtype=torch.uint8)
    memory = block.numpy()
    tensors, arrays = {}, {}
    for name, (shape, dtype) in specs.items():
        o, n = offsets[name], math.prod(shape) * np.dtype(dtype).itemsize
        arrays[name] = memory[o:o + n].view(dtype).reshape(shape)
        tensors[name] = block[o:o + n].view(_TORCH_DTYPES[np.dtype(dtype)]).view(shape)
    return tensors, arrays


class TrainStream(IterableDataset):
    """Infinite batches for one rank. With ``num_streams`` DataLoader workers, worker w produces the
    steps ``start_step + w + j * num_streams`` from stream ``(start_step + w) % num_streams``, so the
    step -> stream mapping (and with it the data order) does not depend on where a run was resumed."""

    def __init__(self, shards: list, label_tars: dict[str, list], tasks: list[str], data_cfg, *, seed: int,
                 rank: int, world_size: int, num_streams: int, start_step: int = 0, positions=None,
                 arch: str = "ViT-B-16", model_config_dir: str | None = None, kappa: bool = False):
        super().__init__()
        self.shards = [str(s) for s in shards]
        self.label_tars = {t: [str(p) for p in v] for t, v in label_tars.items()}
        self.tasks = list(tasks)
        self.kinds = {t: list(TASK_KINDS[t]) for t in self.tasks}
        if kappa and "normal" in self.kinds:
            self.kinds["normal"].append("normal_conf")
        self.cfg = data_cfg
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_streams = max(1, num_streams)
        self.start_step = start_step
        self.positions = [tuple(p) for p in positions] if positions else [(0, 0)] * self.num_streams
        if len(self.positions) != self.num_streams:
            raise DataError(f"{len(self.positions)} stream positions for {self.num_streams} streams")
        self.arch, self.model_config_dir = arch, model_config_dir
        c = data_cfg
        self.pairs = image_batch_pairs(c.base_resolution, c.min_resolution, c.max_resolution, c.num_scales,
                                       c.size_multiple, c.batch_size)
        self._tokenizer = None

    # -- which shards a chunk reads ---------------------------------------------------------------
    def chunk_shards(self, stream: int, chunk: int) -> list[int]:
        n, k = len(self.shards), self.cfg.shards_per_chunk
        if self.cfg.resampled:
            rng = random.Random(f"{self.seed}/shards/{self.rank}/{stream}/{chunk}")
            return [rng.randrange(n) for _ in range(k)]
        # epoch-shuffled shard list, split by rank (node) and by stream (worker)
        mine_len = len(range(n)[self.rank::self.world_size][stream::self.num_streams])
        if mine_len == 0:
            raise DataError(f"{n} shards cannot be split over {self.world_size} ranks x {self.num_streams} "
                            f"workers; use data.resampled: true or fewer workers")
        per_epoch = math.ceil(mine_len / k)
        epoch, i = divmod(chunk, per_epoch)
        order = list(range(n))
        random.Random(f"{self.seed}/epoch/{epoch}").shuffle(order)
        mine = order[self.rank::self.world_size][stream::self.num_streams]
        return mine[i * k:(i + 1) * k]

    def chunk_items(self, stream: int, chunk: int) -> Iterator:
        import webdataset as wds

        joined = [join_shard(self.shards[i], {t: self.label_tars[t][i] for t in self.tasks}, self.kinds)
                  for i in self.chunk_shards(stream, chunk)]
        rng = random.Random(f"{self.seed}/shuffle/{self.rank}/{stream}/{chunk}")
        return wds.filters._shuffle(_roundrobin(joined), self.cfg.shuffle_buffer, self.cfg.shuffle_initial, rng=rng)

    def items(self, stream: int, position: tuple[int, int]) -> Iterator[tuple]:
        """(item, (chunk, consumed)) forever, starting after ``position``."""
        chunk, skip = position
        empty = 0
        while True:
            it = self.chunk_items(stream, chunk)
            consumed = 0
            for item in it:
                consumed += 1
                if consumed <= skip:
                    continue  # already used before the checkpoint: not decoded
                yield item, (chunk, consumed)
            empty = empty + 1 if consumed == 0 else 0
            if empty > 1000:
                raise DataError(f"rank {self.rank} stream {stream}: 1000 chunks in a row yielded nothing")
            chunk, skip = chunk + 1, 0

    # -- batches ---------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            import open_clip

            from trainer.model import register_model_configs

            register_model_configs(self.model_config_dir)
            self._tokenizer = open_clip.get_tokenizer(self.arch)
        return self._tokenizer

    def make_batch(self, step: int, items: Iterator, stream: int) -> dict:
        c = self.cfg
        h, w, bs = step_shape(self.pairs, self.seed, step)
        lh, lw = L.label_shape((h, w), c.label_scale)
        rng = random.Random(f"{self.seed}/aug/{self.rank}/{step}")
        counts = [0] * len(REASONS)
        # the batch is allocated once and every sample is written into its slot (no stacking copies)
        specs = {"image": ((bs, h, w, 3), np.uint8)}
        for kind in (k for ks in self.kinds.values() for k in ks):
            # the compact wire form (see load_sample's as_codes); labels_to_values makes floats
            specs[kind] = ((bs, lh, lw), np.uint8 if kind == "seg" else np.uint16)
            if kind not in ("seg", "normal"):
                specs[f"{kind}_lo"] = specs[f"{kind}_scale"] = ((bs,), np.float32)
        tensors, arrays = _one_block(specs)
        captions, failures, pos = [], 0, None
        while len(captions) < bs:
            item, pos = next(items)
            if isinstance(item, tuple):
                counts[R[item[1]]] += 1
                failures += 1
            else:
                i = len(captions)
                slot = {k: a[i] for k, a in arrays.items() if a.ndim > 1}
                try:
                    s = load_sample(item, h, w, lh, lw, rng, self.kinds, c.crop_scale, c.crop_ratio, c.hflip, slot,
                                    as_codes=True)
                    for k, a in arrays.items():
                        if a.ndim == 1:
                            a[i] = s[k]
                    captions.append(s["caption"])
                    failures = 0
                except SampleError as e:
                    counts[R[e.reason]] += 1
                    counts[R["samples_skipped"]] += 1
                    failures += 1
            if failures > MAX_CONSECUTIVE_SKIPS:
                raise DataError(f"rank {self.rank}: {failures} records in a row were unusable; counts so far: "
                                f"{ {r: n for r, n in zip(REASONS, counts) if n} }")
        batch = dict(tensors)  # image (B, h, w, 3), labels (B, lh, lw)
        batch.update({"text": self.tokenizer(captions), "step": step, "stream": stream, "pos": pos,
                      "skips": torch.tensor(counts, dtype=torch.int64),
                      "worker_cpu_s": time.process_time()})  # this worker's CPU clock (loader cost, P4)
        return batch

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if workers != self.num_streams:
            raise DataError(f"TrainStream built for {self.num_streams} streams but read by {workers} workers")
        stream = (self.start_step + worker) % self.num_streams
        items = self.items(stream, self.positions[stream])
        step = self.start_step + worker
        while True:
            yield self.make_batch(step, items, stream)
            step += self.num_streams


_LUTS: dict = {}


def labels_to_values(batch: dict, kinds: list[str], device) -> dict[str, torch.Tensor]:
    """The wire form of ``make_batch`` -> float targets on ``device``, the same values
    ``pipeline.labels.decode`` gives: seg stays uint8; quantised maps are ``lo + q * scale`` in
    float32; normal codes go through the octahedral decode table, (B, H, W, 3)."""
    out = {}
    for kind in kinds:
        t = batch[kind].to(device, non_blocking=True)
        if kind == "seg":
            out[kind] = t
        elif kind == "normal":
            if device not in _LUTS:
                _LUTS[device] = torch.from_numpy(L.octahedral_table()).to(device)
            out[kind] = _LUTS[device][t.to(torch.int32)]
        else:
            # non_blocking: from the loader's pinned memory a blocking copy would make the host wait
            lo = batch[f"{kind}_lo"].to(device, non_blocking=True)[:, None, None]
            scale = batch[f"{kind}_scale"].to(device, non_blocking=True)[:, None, None]
            out[kind] = t.to(torch.float32).mul_(scale).add_(lo)  # two roundings, as numpy's decode
    return out


def make_loader(dataset: TrainStream, num_workers: int, pin_memory: bool, prefetch_factor: int = 2) -> DataLoader:
    kw = dict(persistent_workers=True, prefetch_factor=prefetch_factor) if num_workers > 0 else {}
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, **kw)
