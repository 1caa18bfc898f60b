"""Trainer configuration: one YAML file -> dataclasses, with command-line overrides.

    cfg = load_config(profile="smoke", config=None, overrides=["optim.lr=1e-4", "tasks=[seg]"])

A YAML file may start from another one with ``base: <file>`` (resolved next to it) and override any
subset of keys. Unknown keys are errors (a typo must not silently fall back to a default). The
defaults in ``configs/default.yaml`` are the paper's Table 8; every value the paper does not give is
marked there with where it comes from.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.labels import TASKS  # noqa: F401 - the label trees the trainer knows

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
    """A configuration problem; the message fits on one line and names the offending key."""


@dataclass
class ModelCfg:
    arch: str = "ViT-B-16"             # open_clip model name (ViT-B-16, RN50, ViT-H-14, ...)
    pretrained: str | None = "openai"  # open_clip tag, a local checkpoint file, or null = random init
    model_config_dir: str | None = None  # extra open_clip model-config JSONs to register
    psp_channels: int = 256            # PSP output channels (the heads' input)
    psp_pool_sizes: list[int] = field(default_factory=lambda: [1, 2, 3, 6])
    psp_dropout: float = 0.1
    head_layers: int = 1               # Table 6: 1 = point-wise conv (light), 3 = heavy head
    grad_checkpointing: bool = False
    compile_dense: bool = False        # torch.compile the PSP, heads and dense losses (bench/g3_train.py measures it)


@dataclass
class DataCfg:
    base_resolution: int = 512         # corenet variable batch sampler: base crop size
    min_resolution: int = 256
    max_resolution: int = 768
    num_scales: int = 5
    size_multiple: int = 32            # every sampled side is a multiple of this
    batch_size: int = 32               # per GPU, at the base resolution (h*w*batch is kept constant)
    label_scale: float = 0.5           # label maps are made at this fraction of the input crop
    crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333333])
    hflip: float = 0.5
    resampled: bool = True             # draw shards with replacement (open_clip --dataset-resampled)
    shards_per_chunk: int = 2          # shards read interleaved into one shuffle buffer
    shuffle_buffer: int = 2000
    shuffle_initial: int = 500
    num_workers: int = 6
    prefetch_factor: int = 2
    num_samples: int | None = None     # samples per epoch; null = manifest expected_samples or a count


@dataclass
class LossCfg:
    clip: float = 1.0
    seg: float = 0.1
    depth: float = 1.0
    normal: float = 1.0
    normal_kappa_weight: bool = False  # weight the normal L1 by the expert's kappa (normal_conf)


@dataclass
class OptimCfg:
    epochs: int = 30
    steps: int | None = None           # total optimizer steps; overrides epochs when set
    lr: float = 3.0e-5
    min_lr: float = 1.0e-6
    warmup_steps: int = 1000
    warmup_init_lr: float = 1.0e-6
    weight_decay: float = 0.2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1.0e-6
    grad_clip: float = 1.0


@dataclass
class RunCfg:
    seed: int = 0
    precision: str = "auto"            # auto = bf16 autocast on CUDA, fp32 on CPU; or fp32 / bf16 / fp16
    ckpt_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 1
    tensorboard: bool = True
    nan_at_step: int | None = None     # fault injection for tests: make that step's loss NaN


@dataclass
class Config:
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    loss: LossCfg = field(default_factory=LossCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    run: RunCfg = field(default_factory=RunCfg)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {"model": ModelCfg, "data": DataCfg, "loss": LossCfg, "optim": OptimCfg, "run": RunCfg}


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular 'base:'")
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping")
    base = doc.pop("base", None)
    if base is None:
        return doc
    return _merge(_read_yaml(path.parent / base, seen + (path,)), doc)


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_tasks(value) -> list[str]:
    """``'seg,depth'`` / ``['seg']`` / ``'none'`` / ``'all'`` -> validated list in canonical order."""
    if value is None:
        return []
    if isinstance(value, str):
        value = value.strip()
        if value in ("", "none", "[]"):
            return []
        if value == "all":
            return list(TASKS)
        value = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [t for t in value if t not in TASKS]
    if unknown:
        raise ConfigError(f"unknown task(s) {unknown}; choose from {list(TASKS)}, 'none' or 'all'")
    return [t for t in TASKS if t in value]


def _coerce(section: str, cls, values: dict):
    if not isinstance(values, dict):
        raise ConfigError(f"'{section}' must be a mapping, got {type(values).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"unknown key(s) {[f'{section}.{k}' for k in unknown]}; known: {sorted(names)}")
    obj = cls()
    for k, v in values.items():
        default = getattr(obj, k)
        if isinstance(default, bool) and not isinstance(v, bool):
            raise ConfigError(f"{section}.{k} must be true or false, got {v!r}")
        if isinstance(default, float) and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if isinstance(default, int) and not isinstance(default, bool) and isinstance(v, float) and v.is_integer():
            v = int(v)
        if default is not None and v is not None and not isinstance(v, type(default)):
            raise ConfigError(f"{section}.{k} must be {type(default).__name__}, got {v!r}")
        setattr(obj, k, v)
    return obj


def from_dict(doc: dict) -> Config:
    doc = dict(doc)
    unknown = sorted(set(doc) - set(SECTIONS) - {"tasks"})
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {unknown}; known: tasks, {', '.join(SECTIONS)}")
    cfg = Config(tasks=parse_tasks(doc.get("tasks", list(TASKS))),
                 **{name: _coerce(name, cls, doc.get(name) or {}) for name, cls in SECTIONS.items()})
    validate(cfg)
    return cfg


def apply_override(doc: dict, item: str) -> dict:
    """``'optim.lr=1e-4'`` -> doc with that key set (the value is parsed as YAML)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value.strip()):
        value = float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
    parts = key.strip().split(".")
    node = doc
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {p!r} is not a section")
    node[parts[-1]] = value
    return doc


def load_config(profile: str = "default", config: str | None = None,
                overrides: list[str] | tuple = ()) -> Config:
    path = Path(config) if config else CONFIG_DIR / f"{profile}.yaml"
    if not config and not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown profile {profile!r}; known: {known} (or pass --config FILE)")
    doc = _read_yaml(path)
    for item in overrides:
        doc = apply_override(doc, item)
    return from_dict(doc)


def validate(cfg: Config) -> None:
    d, o, m = cfg.data, cfg.optim, cfg.model
    if not (0 < d.min_resolution <= d.base_resolution <= d.max_resolution):
        raise ConfigError("need 0 < data.min_resolution <= data.base_resolution <= data.max_resolution")
    if d.batch_size < 1 or d.num_scales < 1 or d.size_multiple < 1:
        raise ConfigError("data.batch_size, data.num_scales and data.size_multiple must be >= 1")
    if not 0 < d.label_scale <= 1:
        raise ConfigError("data.label_scale must be in (0, 1]")
    if len(d.crop_scale) != 2 or not 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1:
        raise ConfigError("data.crop_scale must be [lo, hi] with 0 < lo <= hi <= 1")
    if len(d.crop_ratio) != 2 or not 0 < d.crop_ratio[0] <= d.crop_ratio[1]:
        raise ConfigError("data.crop_ratio must be [lo, hi] with 0 < lo <= hi")
    if m.head_layers not in (1, 3):
        raise ConfigError("model.head_layers must be 1 (light, the paper's default) or 3 (heavy, Table 6)")
    if o.steps is not None and o.steps < 1:
        raise ConfigError("optim.steps must be >= 1")
    if o.epochs < 1 or o.warmup_steps < 0 or o.lr <= 0 or o.min_lr < 0:
        raise ConfigError("optim.epochs >= 1, optim.warmup_steps >= 0, optim.lr > 0, optim.min_lr >= 0")
    if len(o.betas) != 2:
        raise ConfigError("optim.betas must be [beta1, beta2]")
    if cfg.run.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError("run.precision must be auto, fp32, bf16 or fp16")
    if cfg.run.ckpt_every < 1 or cfg.run.keep_checkpoints < 1 or cfg.run.log_every < 1:
        raise ConfigError("run.ckpt_every, run.keep_checkpoints and run.log_every must be >= 1")
