"""CLIPTeX model: open_clip image + text towers, a shared PSP module and a point-wise head per task.

    dense features = ViT patch tokens (after ln_post) or the ResNet's last stage
    PSP (pools 1, 2, 3, 6 -> 1x1 conv to C/4 each, concat with the input, 3x3 fuse, dropout)
    head per task  = 1x1 conv (light, the paper's default) or 3 conv layers (heavy, Table 6)
    outputs        = at the feature grid; the losses nearest-upsample them to the label size (paper,
                     Section 3; trainer.losses)

The dense branch runs channels-last (NHWC): a ViT's patch tokens (B, N, C) already are NHWC once
their token axis is read as (h, w), and its parameters are stored channels-last too, so that each
weight's gradient has the parameter's own strides. Otherwise the 1x1 convs' weight gradients come back
with channels-last strides that autograd accepts (only the size-1 dims differ) but DDP's gradient
buckets do not ("Grad strides do not match bucket view strides").

Variable resolution: the towers' learned position embeddings are interpolated (bicubic) to the input's
token grid on the fly; at the model's own image size nothing is interpolated, so the forward pass is
exactly open_clip's ``encode_image`` (the export test relies on this).
"""
from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "models"
HEAD_OUT = {"seg": 81, "depth": 1, "normal": 3}  # seg: background + 80 COCO classes (pipeline.labels)


class PretrainedUnavailable(RuntimeError):
    """A pretrained tag was requested but its weights are neither cached nor downloadable."""


def register_model_configs(extra_dir: str | None = None) -> None:
    """Make our tiny smoke architectures (and any user folder of JSONs) known to open_clip."""
    import open_clip

    for d in (MODEL_CONFIG_DIR, extra_dir):
        if d and Path(d) not in open_clip.factory._MODEL_CONFIG_PATHS:
            open_clip.add_model_config(Path(d))


def _online(host: str, timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or os.environ.get("TRANSFORMERS_OFFLINE", "0") not in ("0", ""):
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_pretrained(arch: str, pretrained: str | None) -> tuple[str | None, dict]:
    """Return (checkpoint to pass to open_clip or None, the tag's config). Never waits on a hub:
    a tag whose weights are not cached on an offline machine fails here with a message saying which
    file is needed and how to supply it."""
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    if not pretrained:
        return None, {}
    if os.path.isfile(pretrained):
        return pretrained, {}
    if os.path.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
        raise PretrainedUnavailable(f"pretrained checkpoint file {pretrained!r} does not exist")
    tag_cfg = get_pretrained_cfg(arch, pretrained)
    if not tag_cfg:
        raise PretrainedUnavailable(
            f"{pretrained!r} is neither a file nor a pretrained tag of {arch} "
            f"(tags: {list_pretrained_tags_by_model(arch)})")
    wanted = []
    hub = tag_cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(hub)
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        for name in names:
            hit = try_to_load_from_cache(repo, name)
            if isinstance(hit, str) and os.path.isfile(hit):
                return hit, tag_cfg
            wanted.append(f"huggingface.co/{repo}/{name}")
    url = tag_cfg.get("url", "")
    if url:
        local = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if local.is_file():
            return str(local), tag_cfg
        wanted.append(url)
    if not _online("huggingface.co" if hub else url.split("/")[2]):
        raise PretrainedUnavailable(
            f"pretrained weights {arch}/{pretrained} are not in the local cache and this machine is offline "
            f"(or HF_HUB_OFFLINE is set). Needed file: {' or '.join(wanted)}. Download it where there is "
            f"internet and pass it with --pretrained /path/to/file, or use --profile smoke (random weights).")
    return pretrained, tag_cfg  # online: open_clip downloads it


def create_clip(arch: str, pretrained: str | None, image_size: int | None, model_config_dir: str | None = None,
                quick_gelu: bool = False):
    """open_clip model (+ its model and preprocess config). ViTs are built at ``image_size`` (open_clip
    resizes the pretrained position embedding once); ResNets keep their config and interpolate in the
    forward. ``quick_gelu`` forces QuickGELU (a resumed run of OpenAI weights, see ``build_model``)."""
    import open_clip

    register_model_configs(model_config_dir)
    checkpoint, tag_cfg = resolve_pretrained(arch, pretrained)
    if quick_gelu:
        tag_cfg = {**tag_cfg, "quick_gelu": True}
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ValueError(f"unknown open_clip model {arch!r}; known: {open_clip.list_models()}")
    is_vit = not isinstance(cfg["vision_cfg"].get("layers"), (list, tuple)) and not cfg["vision_cfg"].get("timm_model_name")
    kwargs = {}
    if is_vit and image_size:
        kwargs["force_image_size"] = image_size
    if tag_cfg.get("quick_gelu") and not cfg.get("quick_gelu"):
        kwargs["force_quick_gelu"] = True  # e.g. OpenAI weights: activations must match the checkpoint
    if checkpoint == pretrained and tag_cfg:
        model = open_clip.create_model(arch, pretrained=pretrained, **kwargs)
    else:
        model = open_clip.create_model(arch, pretrained=checkpoint, **kwargs)
    pp = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    for k in ("mean", "std"):
        if tag_cfg.get(k):
            pp[k] = tuple(tag_cfg[k])
    pp.setdefault("mean", open_clip.OPENAI_DATASET_MEAN)
    pp.setdefault("std", open_clip.OPENAI_DATASET_STD)
    model_cfg = dict(cfg)
    model_cfg["vision_cfg"] = dict(cfg["vision_cfg"])
    if "force_image_size" in kwargs:
        model_cfg["vision_cfg"]["image_size"] = image_size
    if kwargs.get("force_quick_gelu"):
        model_cfg["quick_gelu"] = True
    return model, model_cfg, pp


def _resample_grid(pos: torch.Tensor, old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """(old_h*old_w, C) position embedding -> (new_h*new_w, C), bicubic."""
    if tuple(old) == tuple(new):
        return pos
    c = pos.shape[-1]
    grid = pos.reshape(1, old[0], old[1], c).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new, mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(new[0] * new[1], c).to(pos.dtype)


class PSP(nn.Module):
    """Pyramid pooling (Zhao et al. 2017) as in corenet's PSP module."""

    def __init__(self, in_ch: int, out_ch: int, pool_sizes=(1, 2, 3, 6), dropout: float = 0.1):
        super().__init__()
        red = max(16, (in_ch // len(pool_sizes)) // 16 * 16)
        self.branches = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(p), nn.Conv2d(in_ch, red, 1, bias=False), nn.BatchNorm2d(red),
                          nn.ReLU(inplace=True)) for p in pool_sizes)
        self.fuse = nn.Sequential(nn.Conv2d(in_ch + red * len(pool_sizes), out_ch, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True), nn.Dropout2d(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        feats = [x] + [F.interpolate(b(x), size=size, mode="bilinear", align_corners=True) for b in self.branches]
        return self.fuse(torch.cat(feats, 1))


def make_head(in_ch: int, out_ch: int, layers: int) -> nn.Module:
    if layers == 1:
        return nn.Conv2d(in_ch, out_ch, 1)
    block = []
    for _ in range(layers - 1):
        block += [nn.Conv2d(in_ch, in_ch, 3, padding=1, bias=False), nn.BatchNorm2d(in_ch), nn.ReLU(inplace=True)]
    return nn.Sequential(*block, nn.Conv2d(in_ch, out_ch, 1))


class CLIPTeX(nn.Module):
    def __init__(self, clip: nn.Module, tasks: list[str], psp_channels: int = 256, pool_sizes=(1, 2, 3, 6),
                 psp_dropout: float = 0.1, head_layers: int = 1):
        super().__init__()
        self.clip = clip
        self.tasks = list(tasks)
        v = clip.visual
        self.is_vit = hasattr(v, "conv1") and hasattr(v, "class_embedding")
        if self.is_vit:
            if getattr(v, "attn_pool", None) is not None or v.pool_type != "tok":
                raise ValueError("dense features need a ViT with class-token pooling (open_clip pool_type='tok')")
            feat_ch = v.transformer.width
        elif hasattr(v, "attnpool") and hasattr(v, "layer4"):
            feat_ch = v.attnpool.k_proj.in_features  # ModifiedResNet: last stage channels
        else:
            raise ValueError(f"unsupported image tower {type(v).__name__} (open_clip ViT or ModifiedResNet)")
        if self.tasks:
            self.psp = PSP(feat_ch, psp_channels, tuple(pool_sizes), psp_dropout)
            self.heads = nn.ModuleDict({t: make_head(psp_channels, HEAD_OUT[t], head_layers) for t in self.tasks})
            self.psp.to(memory_format=torch.channels_last)
            self.heads.to(memory_format=torch.channels_last)

    # -- image tower ----------------------------------------------------------------------------
    def _vit(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.clip.visual
        x = v.conv1(x)
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)
        pos = v.positional_embedding
        pos = torch.cat([pos[:1], _resample_grid(pos[1:], v.grid_size, (gh, gw))])
        x = x + pos.to(x.dtype)
        x = v.ln_pre(v.patch_dropout(x))
        x = v.transformer(x)
        pooled, tokens = v._pool(x)
        if v.proj is not None:
            pooled = pooled @ v.proj
        dense = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, gh, gw)
        return pooled, dense

    def _resnet(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.clip.visual
        x = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(x)))))
        ap = v.attnpool
        side = int(round((ap.positional_embedding.shape[0] - 1) ** 0.5))
        pos = ap.positional_embedding
        pos = torch.cat([pos[:1], _resample_grid(pos[1:], (side, side), tuple(x.shape[-2:]))])
        t = x.flatten(2).permute(2, 0, 1)  # (HW, N, C)
        t = torch.cat([t.mean(dim=0, keepdim=True), t]) + pos[:, None, :].to(t.dtype)
        pooled, _ = F.multi_head_attention_forward(
            query=t, key=t, value=t, embed_dim_to_check=t.shape[-1], num_heads=ap.num_heads,
            q_proj_weight=ap.q_proj.weight, k_proj_weight=ap.k_proj.weight, v_proj_weight=ap.v_proj.weight,
            in_proj_weight=None, in_proj_bias=torch.cat([ap.q_proj.bias, ap.k_proj.bias, ap.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=ap.c_proj.weight,
            out_proj_bias=ap.c_proj.bias, use_separate_proj_weight=True, training=self.training, need_weights=False)
        return pooled[0], x

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(global embedding, dense features NCHW) at any input size."""
        pooled, dense = self._vit(images) if self.is_vit else self._resnet(images)
        return (F.normalize(pooled, dim=-1) if normalize else pooled), dense

    def dense_heads(self, dense: torch.Tensor) -> dict[str, torch.Tensor]:
        """Dense features (B, C, h, w) -> {task: head output (B, HEAD_OUT[task], h, w)}."""
        feats = self.psp(dense.contiguous(memory_format=torch.channels_last))  # a no-op for ViT tokens
        return {t: head(feats) for t, head in self.heads.items()}

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> dict:
        """Global image/text embeddings and temperature, plus each task's head output at the
        feature grid (the losses upsample them to the label size)."""
        image_features, dense = self.encode_image(images)
        out = {"image_features": image_features,
               "text_features": self.clip.encode_text(texts, normalize=True),
               "logit_scale": self.clip.logit_scale.exp()}
        if self.tasks:
            out.update(self.dense_heads(dense))
        return out


def compile_dense(model: CLIPTeX, criterion, backend: str = "inductor") -> None:
    """``torch.compile`` the dense branch (PSP + heads) and the dense loss terms in place; the CLIP
    towers and the contrastive loss stay eager. Each new (batch, crop) shape compiles once per process
    (a handful with variable resolution; dynamo turns the sizes dynamic after the second)."""
    if model.tasks:
        model.dense_heads = torch.compile(model.dense_heads, backend=backend)
        criterion.dense = torch.compile(criterion.dense, backend=backend)


def build_model(cfg, saved: dict | None = None) -> tuple[CLIPTeX, dict, dict]:
    """CLIPTeX from a ``Config``; returns (model, open_clip model_cfg, preprocess cfg with mean/std).
    ``saved`` = a checkpoint's {"model_cfg", "preprocess"}: the architecture is rebuilt exactly (e.g.
    QuickGELU of OpenAI weights) with no pretrained download, since the weights come from the checkpoint."""
    m = cfg.model
    pretrained = None if saved else m.pretrained
    quick_gelu = bool(saved and saved["model_cfg"].get("quick_gelu"))
    clip, model_cfg, pp = create_clip(m.arch, pretrained, cfg.data.base_resolution, m.model_config_dir, quick_gelu)
    if saved:
        model_cfg, pp = saved["model_cfg"], saved["preprocess"]
    if m.grad_checkpointing:
        clip.set_grad_checkpointing(True)
    model = CLIPTeX(clip, cfg.tasks, m.psp_channels, m.psp_pool_sizes, m.psp_dropout, m.head_layers)
    return model, model_cfg, pp
