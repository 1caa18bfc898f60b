"""The pipeline's books, per sample: for every damaged-tar class, every shard's marker, manifest and
parquet row satisfy source samples = labelled + skipped, with the reason recorded for the right
sample. Source samples are counted here independently of the reader: runs of consecutive members
that share a key (the part of the name before the first '.' of its base name)."""
from __future__ import annotations

import gzip
import io
import json
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from pipeline import labels
from pipeline.outputs import build_manifest, write_manifest
from pipeline.plan import JobSpec
from pipeline.manifest import ShardSet
from pipeline.shards import Record, SampleLedger, Skip, iter_records
from pipeline.worker import WorkerConfig, process_shard
from tests.test_pipeline import label_keys
from tests.test_shards import jpeg, png, raw_tar


def count_source_samples(path: Path) -> int:
    n, last = 0, None
    try:
        with tarfile.open(path, "r|*") as tar:
            for info in tar:
                head, _, base = info.name.rpartition("/")
                key = (head + "/" if head else "") + base.split(".")[0]
                if key != last:
                    n, last = n + 1, key
    except (tarfile.TarError, OSError, EOFError, zlib.error):
        pass  # a broken walk: the samples it started are the shard's samples
    return n


@pytest.fixture(scope="module")
def photos(sample_dir):
    """Members of real samples (img2dataset layout: jpg, txt, json) from the embedded sample."""
    return [r for r in iter_records(sorted(sample_dir.glob("*.tar"))[0]) if isinstance(r, Record)]


def members(rec: Record, key: str, **replace) -> list[tuple[str, bytes]]:
    m = {**rec.members, **replace}
    return [(f"{key}.{ext}", data) for ext, data in m.items() if data is not None]


def symlink_tar(path, good):
    link = tarfile.TarInfo("l.jpg")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    return raw_tar(path, good + [link, ("l.txt", b"x")])


def gzip_bomb_tar(path, good):
    """A gzip-compressed tar whose second sample holds a 65 MB member (64 KB on disk)."""
    buf = io.BytesIO()
    raw_tar(buf, good[:3] + [("b.jpg", bytes(65 << 20)), ("b.txt", b"x")] + good[3:])
    Path(path).write_bytes(gzip.compress(buf.getvalue(), compresslevel=6))
    return path


def png_bomb() -> bytes:
    data = bytearray(png(Image.new("L", (64, 64))))
    data[16:24] = (100_000).to_bytes(4, "big") * 2  # IHDR claims 100000 x 100000 pixels
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


def build(case: str, p: list[Record], path: Path, sample_dir: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """Write the damaged shard of ``case`` to ``path``; return the expected (key, reason) skips in
    source order and the expected shard damage."""
    a, b, c = p[0], p[1], p[2]
    html = b"<html><body>404 not found</body></html>"
    if case == "repeated_member":  # 000010.jpg twice back to back, the second another photo
        raw_tar(path, [("k1.jpg", a.members["jpg"]), ("k1.jpg", b.members["jpg"])] + members(a, "k1", jpg=None)
                + members(c, "k2"))
        return [("k1", "duplicate_member")], []
    if case == "duplicate_key":
        raw_tar(path, members(a, "k1") + members(b, "k2") + members(c, "k1"))
        return [("k1", "duplicate_key")], []
    if case == "path_traversal":
        raw_tar(path, [("../evil.jpg", a.members["jpg"]), ("../evil.txt", b"x"), ("/abs/evil.jpg", a.members["jpg"])]
                + members(b, "k2"))
        return [("../evil", "unsafe_member_name"), ("/abs/evil", "unsafe_member_name")], []
    if case == "symlink":
        symlink_tar(path, members(a, "k1"))
        return [("l", "not_a_file")], []
    if case == "gzip_bomb":
        gzip_bomb_tar(path, members(a, "a") + members(c, "c"))
        return [("b", "member_too_large")], []
    if case == "truncated_tar":
        data = (sorted(sample_dir.glob("*.tar"))[0]).read_bytes()
        path.write_bytes(data[: len(data) * 3 // 5])
        return [("(the sample the cut goes through)", "incomplete_sample")], ["truncated_tar"]
    if case == "empty_file":
        path.write_bytes(b"")
        return [], ["empty_tar"]
    if case == "no_members":
        raw_tar(path, [])
        return [], ["empty_tar"]
    if case == "image_bomb":
        raw_tar(path, members(a, "k1") + [("k2.png", png_bomb()), ("k2.txt", b"a bomb")] + members(c, "k3"))
        return [("k2", "decompression_bomb")], []
    if case == "bad_utf8":
        raw_tar(path, members(a, "k1", txt=b"caf\xe9 \xff") + members(b, "k2"))
        return [("k1", "invalid_caption")], []
    if case == "missing_image":
        raw_tar(path, members(a, "k1", jpg=None) + members(b, "k2"))
        return [("k1", "missing_image")], []
    if case == "undecodable_image":
        jpg = a.members["jpg"]
        raw_tar(path, members(a, "k1", jpg=html) + members(b, "k2", jpg=jpg[: len(jpg) // 3])
                + members(c, "k3", jpg=b"") + members(a, "k4"))
        return [("k1", "not_an_image"), ("k2", "truncated_image"), ("k3", "empty_image")], []
    if case == "missing_caption":
        raw_tar(path, members(a, "k1", txt=None) + members(b, "k2"))
        return [("k1", "missing_caption")], []
    raise ValueError(case)


CASES = ["repeated_member", "duplicate_key", "path_traversal", "symlink", "gzip_bomb", "truncated_tar",
         "empty_file", "no_members", "image_bomb", "bad_utf8", "missing_image", "undecodable_image",
         "missing_caption"]


def manifest_for(src: Path, out: Path, stats: list[dict], experts: dict) -> tuple[dict, list[dict]]:
    spec = JobSpec(shard_set=ShardSet("books", src.parent, (src,), out), out=out,
                   worker=WorkerConfig(profile="null"))
    manifest, rows = build_manifest(spec, stats, {t: e.describe() for t, e in experts.items()}, "fp")
    write_manifest(out, manifest, rows)
    import pandas as pd

    return json.loads((out / "_manifest.json").read_text()), pd.read_parquet(out / "_manifest.parquet").to_dict("records")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", CASES)
def test_every_sample_is_labelled_or_skipped_once(case, photos, sample_dir, null_experts, tmp_path):
    src = tmp_path / "src" / "00000.tar"
    src.parent.mkdir()
    want_skips, want_damage = build(case, photos, src, sample_dir)
    n = count_source_samples(src)
    out = tmp_path / "out"
    stats = process_shard(src, out, null_experts, WorkerConfig(profile="null", torch_threads=1))
    skips = [(s["key"], s["reason"]) for s in stats["skips"]]
    if case == "truncated_tar":  # the cut is inside a sample (incomplete) or, by chance, between two
        assert len(skips) <= 1 and all(r == "incomplete_sample" for _, r in skips), skips
        want_skips = skips
    assert skips == want_skips
    assert [d["reason"] for d in stats["shard_damage"]] == want_damage
    assert stats["samples"] == n == stats["ok"] + stats["skipped"], (stats["samples"], n)
    assert stats["skipped"] == len(want_skips) and sum(stats["skip_reasons"].values()) == len(want_skips)
    labelled = label_keys(out / "seg" / src.name)
    skipped_keys = {k for k, _ in want_skips} - ({"k1"} if case == "duplicate_key" else set())  # 1st k1 stays
    assert len(labelled) == stats["ok"] and not skipped_keys & set(labelled)
    manifest, rows = manifest_for(src, out, [stats], null_experts)
    counts = manifest["counts"]
    assert counts["samples"] == n == counts["ok"] + counts["skipped"]
    assert counts["skip_reasons"] == stats["skip_reasons"]
    assert counts["shard_damage"] == {r: 1 for r in want_damage}
    assert rows[0]["samples"] == n == rows[0]["ok"] + rows[0]["skipped"]


@pytest.mark.timeout(120)
def test_duplicate_key_keeps_the_first_sample_and_its_labels(photos, null_experts, tmp_path):
    """The first 'k1' is labelled, from its own photo; the second is skipped, never merged into it."""
    src = tmp_path / "00000.tar"
    raw_tar(src, members(photos[0], "k1") + members(photos[1], "k2") + members(photos[2], "k1"))
    stats = process_shard(src, tmp_path / "out", null_experts, WorkerConfig(profile="null", torch_threads=1))
    assert label_keys(tmp_path / "out" / "seg" / src.name) == ["k1", "k2"]
    assert [(s["index"], s["key"], s["reason"]) for s in stats["skips"]] == [(2, "k1", "duplicate_key")]
    from cliptex_labels import LabelTar, decode_with_header

    with LabelTar(tmp_path / "out" / "depth" / src.name) as t:
        header, _ = decode_with_header(t.read("k1", "depth"))
    first = Image.open(io.BytesIO(photos[0].members["jpg"]))
    assert header["image_size"] == [first.height, first.width]


@pytest.mark.timeout(120)
def test_source_modes_orientation_and_near_constant_images_are_counted(null_experts, tmp_path):
    img2dataset = pytest.importorskip("img2dataset.resizer")
    astro = skimage.data.astronaut()[::2, ::2].copy()
    grey = skimage.data.camera()
    sixteen = Image.fromarray(grey.astype(np.uint16) * 257)
    # what img2dataset makes of a 16-bit PNG: a JPEG, reported as a success, that is all white
    white, *_, err = img2dataset.Resizer(image_size=128, resize_mode="keep_ratio", resize_only_if_bigger=False)(
        io.BytesIO(png(sixteen)))
    assert err is None and np.asarray(Image.open(io.BytesIO(white))).min() == 255
    exif = Image.Exif()
    exif[0x0112] = 6

    def sample(key, image_bytes):
        return [(f"{key}.jpg" if image_bytes[:2] == b"\xff\xd8" else f"{key}.png", image_bytes),
                (f"{key}.txt", b"a photo")]

    cmyk = io.BytesIO()
    Image.fromarray(astro).convert("CMYK").save(cmyk, format="JPEG")
    src = raw_tar(tmp_path / "00000.tar",
                  sample("rgb", jpeg(astro)) + sample("cmyk", cmyk.getvalue()) + sample("grey", jpeg(grey))
                  + sample("p", png(Image.fromarray(astro).convert("P"))) + sample("rgba", png(Image.fromarray(skimage.data.logo())))
                  + sample("i16", png(sixteen)) + sample("white", white)
                  + sample("rot", jpeg(astro[:, :200], exif=exif.tobytes())))
    stats = process_shard(src, tmp_path / "out", null_experts, WorkerConfig(profile="null", torch_threads=1))
    assert stats["ok"] == stats["samples"] == 8
    assert stats["source_modes"] == {"CMYK": 1, "I;16": 1, "L": 2, "P": 1, "RGB": 2, "RGBA": 1}
    assert stats["exif_orientations"] == {"1": 7, "6": 1}
    assert stats["near_constant"] == 1
    notes = {n["key"]: (n["mode"], n["orientation"], n["near_constant"]) for n in stats["sample_notes"]}
    assert notes == {"cmyk": ("CMYK", 1, False), "grey": ("L", 1, False), "p": ("P", 1, False),
                     "rgba": ("RGBA", 1, False), "i16": ("I;16", 1, False), "white": ("L", 1, True),
                     "rot": ("RGB", 6, False)}
    manifest, rows = manifest_for(src, tmp_path / "out", [stats, stats], null_experts)
    assert manifest["counts"]["near_constant"] == 2 and manifest["counts"]["source_modes"]["RGB"] == 4
    assert manifest["counts"]["exif_orientations"] == {"1": 14, "6": 2}
    assert rows[0]["not_rgb"] == 6 and rows[0]["rotated"] == 1 and rows[0]["near_constant"] == 1


def test_the_ledger_refuses_books_that_do_not_balance():
    ledger = SampleLedger()
    ledger.read(0, Skip("a", "missing_image"))
    ledger.read(1, Skip(None, "truncated_tar"))
    with pytest.raises(ValueError, match="unknown skip reason"):
        ledger.skip(5, "x", "no_such_reason")
    from cliptex_labels.images import Sample

    s = Sample("b", np.zeros((4, 4, 3), np.uint8), "c", {}, b"", "RGB")
    assert ledger.read(2, s) is s
    with pytest.raises(RuntimeError, match="neither labelled nor skipped"):
        ledger.stats()
    ledger.labelled(2)
    with pytest.raises(RuntimeError, match="settled twice"):
        ledger.skip(2, "b", "expert_error")
    books = ledger.stats()
    assert (books["samples"], books["ok"], books["skipped"]) == (2, 1, 1)
    assert books["shard_damage"] == [{"index": 1, "reason": "truncated_tar", "detail": ""}]
    assert labels.FORMAT_VERSION == 2
