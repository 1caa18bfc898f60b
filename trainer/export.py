"""Export a trained CLIPTeX model for open_clip (PSP and task heads dropped: they only serve training).

    python -m trainer.export --run-dir runs/sample-smoke-seg+depth+normal [--checkpoint latest|PATH] [--out DIR]

writes into ``<run>/export`` (or ``--out``; a folder or a URL):

    open_clip_pytorch_model.bin  the full CLIP model (image + text towers, temperature):
                                 open_clip.create_model(<arch>, pretrained=<this file>)
    open_clip_config.json        model + preprocess config:  open_clip.create_model("local-dir:<export dir>")
    image_encoder.pt             the image tower alone (keys of model.visual):
                                 open_clip.create_model(<arch>, pretrained_image_path=<this file>)
                                 or model.visual.load_state_dict(torch.load(<this file>))
    export.json                  the arch name to use and the lines above

ViTs are trained at the base resolution (the position embedding was resized to its grid), so
``<arch>`` must be created with ``force_image_size=<base>`` (the ``local-dir:`` form does it by
itself); without it open_clip resizes the embedding back to the config's size when loading.
"""
from __future__ import annotations

import argparse
import json
import sys

from pipeline import storage
from trainer.checkpoint import save_torch


def arch_name(arch: str, model_cfg: dict) -> str:
    """open_clip name whose config matches ``model_cfg`` (e.g. OpenAI weights need QuickGELU)."""
    import open_clip

    if model_cfg.get("quick_gelu") and not (open_clip.get_model_config(arch) or {}).get("quick_gelu"):
        if f"{arch}-quickgelu" in open_clip.list_models():
            return f"{arch}-quickgelu"
    return arch


def export(model, model_cfg: dict, preprocess: dict, arch: str, out_dir) -> dict[str, str]:
    out_dir = storage.normalize(out_dir)
    storage.makedirs(out_dir)
    state = {k: v.detach().cpu().clone() for k, v in model.clip.state_dict().items()}
    visual = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    names = {"clip": "open_clip_pytorch_model.bin", "image_encoder": "image_encoder.pt",
             "config": "open_clip_config.json", "info": "export.json"}
    paths = {k: storage.join(out_dir, n) for k, n in names.items()}
    save_torch(state, paths["clip"])
    save_torch(visual, paths["image_encoder"])
    size = model_cfg["vision_cfg"].get("image_size", 224)
    pp = {"size": size, "mode": "RGB", "mean": list(preprocess["mean"]), "std": list(preprocess["std"]),
          "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0}
    storage.write_text_atomic(paths["config"], json.dumps({"model_cfg": model_cfg, "preprocess_cfg": pp}, indent=1))
    name = arch_name(arch, model_cfg)
    info = {"arch": name, "image_size": size, "files": names,
            "load_full": f"open_clip.create_model({name!r}, pretrained={paths['clip']!r}, force_image_size={size})",
            "load_local_dir": f"open_clip.create_model('local-dir:{out_dir}')",
            "load_image_encoder": f"open_clip.create_model({name!r}, pretrained_image_path={paths['image_encoder']!r}, "
                                  f"force_image_size={size})"}
    storage.write_text_atomic(paths["info"], json.dumps(info, indent=1))
    return paths


def main(argv=None) -> int:
    from trainer import checkpoint as ckpt
    from trainer import params
    from trainer.model import build_model

    p = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", required=True)
    p.add_argument("--checkpoint", default="latest", help="'latest' or a checkpoint path")
    p.add_argument("--out", default=None, help="default: <run-dir>/export")
    args = p.parse_args(argv)
    path = ckpt.find(args.run_dir, args.checkpoint)
    if path is None:
        print(f"error: no checkpoint in {args.run_dir}", file=sys.stderr)
        return 2
    state = ckpt.load(path)
    cfg = params.from_dict(state["config"])
    model, model_cfg, preprocess = build_model(cfg, saved=state["arch"])
    model.load_state_dict(state["model"])
    paths = export(model, model_cfg, preprocess, cfg.model.arch, args.out or storage.join(args.run_dir, "export"))
    print(json.dumps({k: storage.redact(v) for k, v in paths.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
