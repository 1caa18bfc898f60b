"""``python -m pipeline.export --format png``: label trees -> 4M-style PNGs, checked against the
stored codes of the label shards (read through the one label-tar reader)."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from cliptex_labels import LabelTar
from pipeline import labels
from pipeline.export import main, read_png, rgb_to_normals
from tests.test_shards import raw_tar


def angle_deg(a, b):
    return np.degrees(np.arccos(np.clip((a.astype(np.float64) * b).sum(-1), -1, 1)))


@pytest.mark.timeout(300)
def test_png_export_round_trips_the_stored_codes(smoke_labels, tmp_path):
    out = tmp_path / "png"
    assert main(["--format", "png", "--labels", str(smoke_labels), str(out)]) == 0
    worst_normal = 0.0
    n_checked = 0
    for task in labels.TASKS:
        for tar in sorted((smoke_labels / task).glob("*.tar")):
            with LabelTar(tar) as t:
                for key, members in t.items():
                    for kind, data in members.items():
                        header, codes = labels.decode_codes(data)
                        path = out / kind / tar.stem / f"{key}.png"
                        meta, pixels = read_png(path.read_bytes())
                        assert meta["kind"] == kind and meta["image_size"] == header["image_size"]
                        assert meta["orientation"] == header["orientation"]
                        mode = Image.open(path).mode
                        if kind == "seg":
                            assert mode == "P" and pixels.dtype == np.uint8
                            assert np.array_equal(pixels, codes)  # class ids, exactly
                        elif kind == "normal":
                            assert mode == "RGB"
                            stored = labels.decode(labels.member_name(key, kind), data)
                            # 4M's convention, computed here from the stored normals
                            want = np.clip(np.rint((stored.astype(np.float64) + 1) * 127.5), 0, 255)
                            assert np.array_equal(pixels, want.astype(np.uint8))
                            worst_normal = max(worst_normal, float(angle_deg(rgb_to_normals(pixels), stored).max()))
                        else:  # 16-bit codes: lossless, and the values come back with lo/hi
                            assert mode.startswith("I;16") and pixels.dtype == np.uint16
                            assert np.array_equal(pixels, codes)
                            assert (meta["lo"], meta["hi"]) == (header["lo"], header["hi"])
                            assert np.array_equal(labels.values_from_codes(header, pixels),
                                                  labels.decode(labels.member_name(key, kind), data))
                        n_checked += 1
    summary = json.loads((out / "_export.json").read_text())
    assert sum(summary["pngs"].values()) == n_checked == 16 * 4 and summary["problems"] == []
    assert worst_normal < 0.39, worst_normal  # 8 bits per axis: at most 0.387° (docs/LABELS.md)
    print(f"normal RGB PNG max angular error vs stored: {worst_normal:.3f} deg")


def test_export_never_turns_a_hostile_key_into_a_path(smoke_labels, tmp_path):
    root = tmp_path / "labels"
    tar = sorted((smoke_labels / "seg").glob("*.tar"))[0]
    with LabelTar(tar) as t:
        key, members = next(iter(t.items()))
    (root / "seg").mkdir(parents=True)
    raw_tar(root / "seg" / tar.name, [(f"../../escape/{key}.seg.lbl", members["seg"]),
                                      (f"sub/{key}.seg.lbl", members["seg"]), (f"{key}.seg.lbl", members["seg"])])
    out = tmp_path / "out" / "png"
    assert main(["--labels", str(root), str(out)]) == 1  # problems -> exit 1
    summary = json.loads((out / "_export.json").read_text())
    assert [p["reason"] for p in summary["problems"]] == ["unsafe_key", "unsafe_key"]
    assert summary["pngs"] == {"seg": 1} and (out / "seg" / tar.stem / f"{key}.png").is_file()
    assert not (tmp_path / "escape").exists() and not list(tmp_path.rglob("escape"))


def test_export_errors(tmp_path):
    assert main(["--labels", str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    (tmp_path / "l" / "seg").mkdir(parents=True)
    assert main(["--labels", str(tmp_path / "l"), "--tasks", "segg", str(tmp_path / "out")]) == 2
    shutil.rmtree(tmp_path / "l")
