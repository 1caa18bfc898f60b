"""Probe configuration: ``probe/configs/default.yaml`` (the paper's Table 9) -> dataclasses.

    cfg = load_probe_config("seg", "linear", profile="smoke", overrides=["optim.lr=1e-4"])

Resolution order, each layer overriding the one before:

1. the top-level sections of ``default.yaml`` (what every probe shares);
2. ``table9.<task>`` then ``table9.<task>/<head>`` of ``default.yaml`` (Table 9 per task and head);
3. the profile (``configs/<profile>.yaml``) or ``--config FILE``: its top-level sections, e.g. the
   smoke profile's small crops and few steps;
4. ``--set section.key=value`` overrides (the trainer's syntax: ``trainer.params.apply_override``).

Files are read with the trainer's reader (``yaml.safe_load``, ``base:`` inheritance) and sections
are checked with its rules: unknown keys and wrongly typed values are errors naming the key.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from trainer.params import ConfigError, _coerce, _merge, _read_yaml, apply_override

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
TASKS = ("seg", "depth", "normal", "cls")
HEADS = {"seg": ("linear", "deeplabv3", "pspnet"), "depth": ("linear", "deeplabv3", "pspnet"),
         "normal": ("linear", "deeplabv3", "pspnet"), "cls": ("linear",)}


@dataclass
class OptimCfg:
    epochs: int = 50
    steps: int | None = None           # total optimizer steps; overrides epochs when set
    lr: float = 3.0e-5                 # maximum LR (after warmup)
    min_lr: float = 3.0e-6
    warmup_steps: int = 500
    warmup_init_lr: float = 1.0e-6
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1.0e-8
    grad_clip: float | None = None


@dataclass
class DataCfg:
    batch_size: int = 32               # per process (GPU), as the trainer's
    crop_size: int = 512               # square training crop (dense tasks); classification: the encoder's size
    eval_size: int | None = None       # short side of evaluation inputs (dense); null = crop_size
    size_multiple: int = 16            # evaluation input sides are rounded to this (the ViT patch)
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    hflip: float = 0.5
    num_workers: int = 4
    train_split: str | None = None     # null = the dataset's standard training split
    val_split: str | None = None       # null = the dataset's standard validation split
    limit_train: int | None = None     # use only the first N training items (smoke runs)
    limit_val: int | None = None


@dataclass
class HeadCfg:
    channels: int = 512                # PSPNet width (DeepLabV3: torchvision's ASPP width, 256)
    atrous_rates: list[int] = field(default_factory=lambda: [6, 12, 18])
    pool_sizes: list[int] = field(default_factory=lambda: [1, 2, 3, 6])
    dropout: float = 0.1


@dataclass
class EvalCfg:
    min_depth: float = 1.0e-3          # metres: valid ground truth is (min_depth, max_depth]
    max_depth: float = 10.0
    eigen_crop: bool = True            # NYUv2 depth: evaluate inside Eigen et al.'s crop (480x640 images)


@dataclass
class RunCfg:
    seed: int = 0
    precision: str = "auto"            # auto = bf16 autocast on CUDA, fp32 on CPU; or fp32 / bf16
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    stop_after: int | None = None      # stop (as if interrupted) after this many steps: tests of --resume


@dataclass
class ProbeConfig:
    task: str
    head: str
    optim: OptimCfg = field(default_factory=OptimCfg)
    data: DataCfg = field(default_factory=DataCfg)
    head_cfg: HeadCfg = field(default_factory=HeadCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    run: RunCfg = field(default_factory=RunCfg)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)  # the YAML section "head" is the field head_cfg


SECTIONS = {"optim": OptimCfg, "data": DataCfg, "head": HeadCfg, "eval": EvalCfg, "run": RunCfg}


def _sections(doc: dict, where: str) -> dict:
    unknown = sorted(set(doc) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {unknown}; known: {sorted(SECTIONS)}")
    return doc


def load_probe_config(task: str, head: str, profile: str = "default", config: str | None = None,
                      overrides: list[str] | tuple = ()) -> ProbeConfig:
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose from {list(TASKS)}")
    if head not in HEADS[task]:
        raise ConfigError(f"task {task!r} has no head {head!r}; choose from {list(HEADS[task])}")
    base = _read_yaml(CONFIG_DIR / "default.yaml")
    table9 = base.pop("table9", {})
    doc = _sections(base, "default.yaml")
    for layer in (task, f"{task}/{head}"):
        doc = _merge(doc, _sections(table9.get(layer) or {}, f"default.yaml table9.{layer}"))
    if config or profile != "default":
        path = Path(config) if config else CONFIG_DIR / f"{profile}.yaml"
        if not config and not path.is_file():
            known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
            raise ConfigError(f"unknown probe profile {profile!r}; known: {known} (or pass --config FILE)")
        extra = _read_yaml(path)
        extra.pop("table9", None)
        doc = _merge(doc, _sections(extra, str(path)))
    for item in overrides:
        doc = apply_override(doc, item)
    _sections(doc, "--set")
    cfg = ProbeConfig(task=task, head=head,
                      **{("head_cfg" if name == "head" else name): _coerce(name, cls, doc.get(name) or {})
                         for name, cls in SECTIONS.items()})
    validate(cfg)
    return cfg


def validate(cfg: ProbeConfig) -> None:
    o, d, r = cfg.optim, cfg.data, cfg.run
    if o.epochs < 1 or o.warmup_steps < 0 or o.lr <= 0 or o.min_lr < 0 or (o.steps is not None and o.steps < 1):
        raise ConfigError("need optim.epochs >= 1, optim.steps >= 1 (or null), optim.warmup_steps >= 0, "
                          "optim.lr > 0, optim.min_lr >= 0")
    if d.batch_size < 1 or d.crop_size < 1 or d.size_multiple < 1 or (d.eval_size is not None and d.eval_size < 1):
        raise ConfigError("data.batch_size, data.crop_size, data.eval_size and data.size_multiple must be >= 1")
    if len(d.scale_range) != 2 or not 0 < d.scale_range[0] <= d.scale_range[1]:
        raise ConfigError("data.scale_range must be [lo, hi] with 0 < lo <= hi")
    if cfg.head == "deeplabv3" and d.batch_size < 2:
        raise ConfigError("the deeplabv3 head needs data.batch_size >= 2 (batch norm after global pooling)")
    if not 0 < cfg.eval.min_depth < cfg.eval.max_depth:
        raise ConfigError("need 0 < eval.min_depth < eval.max_depth")
    if r.precision not in ("auto", "fp32", "bf16"):
        raise ConfigError("run.precision must be auto, fp32 or bf16")
    if r.ckpt_every < 1 or r.keep_checkpoints < 1 or r.log_every < 1:
        raise ConfigError("run.ckpt_every, run.keep_checkpoints and run.log_every must be >= 1")
