"""The frozen image encoder under evaluation, from any of the places a user has one:

    --ckpt runs/<run>/export       our export (``python -m trainer.train --export`` / ``trainer.export``)
    --ckpt runs/<run>              a trainer run directory (its latest checkpoint)
    --ckpt runs/<run>/checkpoints/step_00001000.pt   one trainer checkpoint
    --ckpt /path/open_clip_pytorch_model.bin --arch ViT-B-16   an open_clip state dict
    --ckpt openai --arch ViT-B-16  an open_clip pretrained tag (from the local cache; never a download
                                   prompt offline: ``trainer.model.PretrainedUnavailable``, exit 2)
    --ckpt none --arch ViT-B-16    random weights (a floor for the probes; smoke tests)

Dense features come from the trainer's ``CLIPTeX.encode_image`` (ViT patch tokens after ln_post,
or the ResNet's last stage) built with no task heads, so any input size works (the position
embedding is interpolated on the fly). ``tasks`` records which pseudo-label tasks the encoder was
trained with when that is known (trainer runs and their exports): it places a run in Table 5.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn


class EncoderError(RuntimeError):
    """The encoder cannot be loaded; the message says what was given and what is expected."""


@dataclass
class Encoder:
    clip: nn.Module                    # the open_clip model (image and text towers)
    dense: nn.Module | None            # trainer.model.CLIPTeX without heads: encode_image -> (pooled, dense);
                                       # None for towers it does not support (zero-shot still works)
    mean: tuple
    std: tuple
    image_size: int                    # the model's own input size (classification, zero-shot)
    tokenizer_name: str                # for open_clip.get_tokenizer
    info: dict = field(default_factory=dict)

    @property
    def dense_channels(self) -> int | None:
        if self.dense is None:
            return None
        v = self.clip.visual
        return v.transformer.width if self.dense.is_vit else v.attnpool.k_proj.in_features

    @property
    def embed_dim(self) -> int:
        return int(self.clip.visual.output_dim)

    def require_dense(self) -> nn.Module:
        if self.dense is None:
            raise EncoderError(f"probes need dense features, which {self.info.get('arch')} does not give here: "
                               f"{self.info.get('dense_error')}")
        return self.dense


def _tasks_of_run(run_dir: Path) -> list[str] | None:
    """The pseudo-label tasks of a trainer run, from its config.yaml."""
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    doc = yaml.safe_load(path.read_text()) or {}
    tasks = doc.get("tasks")
    return list(tasks) if isinstance(tasks, list) else None


def _image_size(model_cfg: dict) -> int:
    size = model_cfg.get("vision_cfg", {}).get("image_size", 224)
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def _from_trainer_checkpoint(path: Path, state: dict) -> tuple:
    from trainer import params
    from trainer.model import build_model

    cfg = params.from_dict(state["config"])
    model, model_cfg, pp = build_model(cfg, saved=state["arch"])
    model.load_state_dict(state["model"])
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    info = {"kind": "trainer", "source": str(path.resolve()), "arch": cfg.model.arch, "tasks": list(cfg.tasks),
            "name": run_dir.name, "step": state.get("step")}
    return model.clip, model_cfg, pp, cfg.model.arch, info


def _from_export(export_dir: Path) -> tuple:
    import open_clip

    from trainer.model import register_model_configs

    register_model_configs()
    meta = json.loads((export_dir / "export.json").read_text())
    conf = json.loads((export_dir / "open_clip_config.json").read_text())
    clip = open_clip.create_model(f"local-dir:{export_dir}")
    pp = conf.get("preprocess_cfg", {})
    run_dir = export_dir.parent
    info = {"kind": "export", "source": str(export_dir.resolve()), "arch": meta.get("arch"), "tasks": _tasks_of_run(run_dir),
            "name": run_dir.name if (run_dir / "config.yaml").is_file() else export_dir.name}
    return clip, conf["model_cfg"], pp, f"local-dir:{export_dir}", info


def encoder_source(ckpt: str, arch: str | None) -> tuple[str, Path | str | None]:
    """What ``--ckpt`` names, without loading weights: ("export", folder), ("trainer", checkpoint),
    ("file", path: a trainer checkpoint or an open_clip state dict), ("open_clip", tag) or
    ("random", None). Raises EncoderError with what is expected instead."""
    from trainer import checkpoint as ckpt_mod

    if not ckpt or not ckpt.strip():
        raise EncoderError("no encoder given: pass --ckpt (an export folder, a trainer run or checkpoint, an "
                           "open_clip checkpoint file or tag with --arch, or 'none' with --arch)")
    p = Path(ckpt)
    if p.is_dir() and (p / "export.json").is_file():
        return "export", p
    if p.is_dir() and (p / "checkpoints").is_dir():
        found = ckpt_mod.find(p, "latest")
        if found is None:
            raise EncoderError(f"trainer run {p} has no checkpoint yet")
        return "trainer", found
    if p.is_dir():
        raise EncoderError(f"{p} is neither an export folder (export.json) nor a trainer run (checkpoints/)")
    if p.is_file():
        return "file", p
    if os.sep in ckpt or ckpt.endswith((".pt", ".pth", ".bin", ".safetensors")):
        raise EncoderError(f"checkpoint {ckpt} does not exist")
    if not arch:
        raise EncoderError(f"--ckpt {ckpt!r} needs --arch (the open_clip model name, e.g. ViT-B-16)")
    return ("random", None) if ckpt.lower() in ("none", "random", "null") else ("open_clip", ckpt)


def check_encoder(ckpt: str, arch: str | None = None, model_config_dir: str | None = None) -> None:
    """Fail fast, before any process group or model exists: the source exists, the architecture is
    known and a pretrained tag's weights are in the local cache."""
    import open_clip

    from trainer.model import PretrainedUnavailable, register_model_configs, resolve_pretrained

    kind, _ = encoder_source(ckpt, arch)
    if kind in ("open_clip", "random"):
        register_model_configs(model_config_dir)
        if open_clip.get_model_config(arch) is None:
            raise EncoderError(f"unknown open_clip model {arch!r} (--arch)")
    if kind == "open_clip":
        try:
            resolve_pretrained(arch, ckpt)
        except PretrainedUnavailable as e:
            raise _offline_error(e, arch) from None


def _offline_error(e: Exception, arch: str) -> EncoderError:
    # the trainer's message ends with advice naming its own flags
    return EncoderError(str(e).split(" Download it")[0] + " Download it where there is internet and "
                        f"pass the file: --ckpt /path/to/file --arch {arch}.")


def load_encoder(ckpt: str, arch: str | None = None, model_config_dir: str | None = None,
                 device: torch.device | str = "cpu", seed: int = 0) -> Encoder:
    from trainer import checkpoint as ckpt_mod
    from trainer.model import CLIPTeX, PretrainedUnavailable, create_clip

    kind, where = encoder_source(ckpt, arch)
    state = None
    if kind == "export":
        clip, model_cfg, pp, tok, info = _from_export(where)
    elif kind == "trainer":
        clip, model_cfg, pp, tok, info = _from_trainer_checkpoint(where, ckpt_mod.load(where))
    else:
        if kind == "file":
            try:
                state = torch.load(where, map_location="cpu", weights_only=True)
            except Exception as e:  # a foreign or truncated file: say which one
                raise EncoderError(f"cannot read checkpoint {where}: {e}") from None
        if isinstance(state, dict) and {"model", "arch", "config"} <= set(state):
            clip, model_cfg, pp, tok, info = _from_trainer_checkpoint(where, state)
        else:
            if not arch:
                raise EncoderError(f"--ckpt {ckpt!r} needs --arch (the open_clip model name, e.g. ViT-B-16)")
            if kind == "random":
                torch.manual_seed(seed)  # random weights: the same floor every time
            try:
                clip, model_cfg, pp = create_clip(arch, None if kind == "random" else ckpt, None, model_config_dir)
            except PretrainedUnavailable as e:
                raise _offline_error(e, arch) from None
            tok = arch
            name = {"random": "random", "file": Path(ckpt).stem, "open_clip": ckpt}[kind]
            info = {"kind": kind, "source": str(Path(ckpt).resolve()) if kind == "file" else ckpt, "arch": arch,
                    "tasks": None, "name": f"{arch}-{name}"}
    clip.eval().requires_grad_(False)
    try:
        dense = CLIPTeX(clip, []).eval().requires_grad_(False)
    except ValueError as e:  # e.g. an attention-pooled ViT: no patch-token map
        dense, info["dense_error"] = None, str(e)
    import open_clip

    mean = tuple(pp.get("mean") or open_clip.OPENAI_DATASET_MEAN)
    std = tuple(pp.get("std") or open_clip.OPENAI_DATASET_STD)
    enc = Encoder(clip=clip, dense=dense, mean=mean, std=std, image_size=_image_size(model_cfg),
                  tokenizer_name=tok, info=info)
    enc.clip.to(device)
    return enc


def describe(enc: Encoder) -> dict:
    """What metrics.json records about the encoder."""
    return {**enc.info, "image_size": enc.image_size, "dense_channels": enc.dense_channels}
