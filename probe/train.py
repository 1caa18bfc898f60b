"""Frozen-encoder probes (paper Section 4.3): train a head on a frozen image encoder, evaluate it.

    python -m probe --task seg|depth|normal|cls --head linear|deeplabv3|pspnet --data DIR --ckpt CKPT
                    [--arch NAME] [--profile default|smoke] [--config FILE] [--set section.key=value ...]
                    [--run-dir DIR] [--resume latest|FILE]
    torchrun --nproc_per_node=8 -m probe ...      # DDP: NCCL on GPUs, gloo on CPU

Read top to bottom: arguments and config -> distributed setup -> data (its layout is checked before
the encoder loads) -> encoder, head, optimizer -> resume -> the loop (frozen encoder forward
without gradients, head forward, loss, backward, step, log, checkpoint) -> evaluation on the
validation split -> ``<run>/metrics.json``. ``python -m probe.table`` gathers runs into the
paper's tables.

Run directory (default ``runs/probe/<encoder>/<dataset>-<task>-<head>``): ``config.yaml``,
``train.jsonl`` (loss and LR per logged step), ``checkpoints/`` (the trainer's atomic step
checkpoints, holding the head, optimizer and RNG states), ``metrics.json``. Exit codes: 0 ok,
2 configuration / data / weights problem (one ``error:`` line), 3 non-finite loss.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from pipeline.storage import write_text_atomic
from probe import datasets as D
from probe.config import ConfigError, load_probe_config
from probe.encoder import EncoderError, check_encoder, describe, load_encoder
from probe.heads import build_dense_head, build_linear_classifier
from probe.losses import angmf_nll_loss, ssi_loss
from probe.metrics import DepthMetric, NormalMetric, SegMetric, TopKMetric, depth_valid_mask, disparity_to_depth
from trainer import checkpoint as ckpt
from trainer.distributed import process_group
from trainer.losses import seg_loss
from trainer.model import PretrainedUnavailable
from trainer.train import lr_at, param_groups

log = logging.getLogger("probe")
EXIT_CONFIG, EXIT_NONFINITE = 2, 3
MAIN_METRIC = {"seg": "mIoU", "depth": "AbsRel", "normal": "a<30", "cls": "top1"}
OUT_CHANNELS = {"depth": 1, "normal": 4}  # normals: x, y, z and kappa (NLL-AngMF)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", required=True, choices=["seg", "depth", "normal", "cls"])
    p.add_argument("--head", default="linear", choices=["linear", "deeplabv3", "pspnet"])
    p.add_argument("--data", required=True, help="dataset root (probe/datasets.py lists the layouts)")
    p.add_argument("--ckpt", required=True, help="export folder, trainer run or checkpoint, open_clip file or tag, or none")
    p.add_argument("--arch", default=None, help="open_clip model name (needed for an open_clip file, tag or none)")
    p.add_argument("--model-config-dir", default=None, help="extra open_clip model-config JSONs")
    p.add_argument("--profile", default="default", help="probe/configs/<profile>.yaml on top of Table 9 (default | smoke)")
    p.add_argument("--config", default=None, help="a YAML of overrides (instead of --profile)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. optim.lr=1e-4")
    p.add_argument("--run-dir", default=None)
    p.add_argument("--resume", default=None, help="'latest' (of --run-dir) or a checkpoint path")
    p.add_argument("--check", action="store_true", help="only check the config, the dataset layout and that the "
                   "encoder's weights are there (no model is built; make probe runs it before torchrun)")
    return p.parse_args(argv)


class EpochSampler(torch.utils.data.Sampler):
    """Epoch ``epoch``'s training order: a permutation seeded by (seed, epoch), cut to whole global
    batches; rank r takes every world-th item. Yields (index, augmentation seed), the seed fixed by
    the item's global position, so the data of a step does not depend on workers or interruptions."""

    def __init__(self, n: int, batch: int, rank: int, world: int, seed: int, epoch: int, skip_batches: int = 0):
        self.n, self.batch, self.rank, self.world = n, batch, rank, world
        self.base = (seed * 1_000_003 + epoch) * 1_000_003
        self.skip = skip_batches
        self.steps = n // (batch * world)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.base)
        perm = torch.randperm(self.n, generator=g)[: self.steps * self.batch * self.world].tolist()
        for pos in range(self.skip * self.batch, self.steps * self.batch):
            j = self.rank + self.world * pos  # global position in the epoch
            yield perm[j], self.base + j

    def __len__(self) -> int:
        return (self.steps - self.skip) * self.batch


def main(argv=None) -> int:
    args = parse_args(argv)
    with process_group(log) as r:
        try:
            return _probe(args, r.distributed, r.rank, r.world, r.local_rank, r.device)
        except (ConfigError, D.DatasetError, EncoderError, PretrainedUnavailable, ckpt.CheckpointError) as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return EXIT_CONFIG


def _all_mean(x: torch.Tensor, distributed: bool, world: int) -> torch.Tensor:
    if distributed:
        x = x.clone()
        dist.all_reduce(x)
        x /= world
    return x


def _forward(task, enc, head, images, out_size):
    """Frozen encoder (no gradients) -> head -> outputs at ``out_size`` (bilinear), float32."""
    with torch.no_grad():
        pooled, dense = enc.dense.encode_image(images, normalize=False)
    if task == "cls":
        return head(pooled).float()
    y = head(dense).float()
    return F.interpolate(y, size=out_size, mode="bilinear", align_corners=False)


def _loss(task, out, target, ev) -> torch.Tensor:
    from expert_wrappers.nll_angmf import norm_normalize

    if task == "seg":
        return seg_loss(out, target)
    if task == "depth":
        return ssi_loss(out[:, 0], target, depth_valid_mask(target, ev.min_depth, ev.max_depth))
    if task == "normal":
        return angmf_nll_loss(norm_normalize(out), target, target.norm(dim=1) > 0.5)
    return F.cross_entropy(out, target)


def evaluate(task, enc, head, dataset, cfg, rank, world, device, autocast, progress: bool) -> dict:
    """The split's metrics; each rank evaluates items rank, rank + world, ... and the sums are added."""
    from tqdm import tqdm

    from expert_wrappers.nll_angmf import norm_normalize

    indices = list(range(rank, len(dataset), world))
    batch = cfg.data.batch_size if task == "cls" else 1  # dense: whole images of different sizes
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch,
                                         num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda")
    metric = {"seg": lambda: SegMetric(dataset.src.num_classes, D.SEG_IGNORE, device), "depth": lambda: DepthMetric(device),
              "normal": lambda: NormalMetric(device), "cls": lambda: TopKMetric((1, 5), device)}[task]()
    head.eval()
    with torch.no_grad():
        for b in tqdm(loader, disable=not progress, desc="eval", dynamic_ncols=True, mininterval=1.0):
            images = b["image"].to(device, non_blocking=True)
            target = b["target"].to(device, non_blocking=True)
            with autocast:
                out = _forward(task, enc, head, images, tuple(target.shape[-2:]))
            if task == "seg":
                metric.update(out.argmax(1), target)
            elif task == "depth":
                valid = depth_valid_mask(target, cfg.eval.min_depth, cfg.eval.max_depth)
                if cfg.eval.eigen_crop:
                    valid &= D.eigen_mask(*target.shape[-2:]).to(device)
                metric.update(disparity_to_depth(out[:, 0], target, valid, cfg.eval.max_depth), target, valid)
            elif task == "normal":
                metric.update(norm_normalize(out)[:, :3], target, target.norm(dim=1) > 0.5)
            else:
                metric.update(out, target)
    metric.all_reduce()
    return metric.compute(dataset.src.class_names) if task == "seg" else metric.compute()


def _probe(args, distributed, rank, world, local_rank, device) -> int:
    main_proc = rank == 0
    task = args.task
    head_kind = "linear" if task == "cls" else args.head
    if task == "cls" and args.head != "linear":
        raise ConfigError("classification has a linear probe only (--head linear)")
    cfg = load_probe_config(task, head_kind, args.profile, args.config, args.set)
    precision = cfg.run.precision if cfg.run.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    # ---- data: the layout is checked before the (slow) encoder load -------------------------------
    root = Path(args.data)
    train_src = D.check_items(D.open_source(task, root, cfg.data.train_split, train=True), task, root, cfg.data.limit_train)
    val_src = D.check_items(D.open_source(task, root, cfg.data.val_split, train=False), task, root, cfg.data.limit_val)
    if task == "seg" and train_src.num_classes != val_src.num_classes:
        raise D.DatasetError("training and validation splits come from different datasets")
    if args.check:
        check_encoder(args.ckpt, args.arch, args.model_config_dir)
        print(f"ok: {task}/{head_kind} on {train_src.name} ({len(train_src.items)} {train_src.split}, "
              f"{len(val_src.items)} {val_src.split} items), encoder {args.ckpt}", flush=True)
        return 0

    # ---- encoder and head -----------------------------------------------------------------------
    with ckpt.rank0_first(distributed, local_rank == 0):
        enc = load_encoder(args.ckpt, args.arch, args.model_config_dir, device, cfg.run.seed)
    enc.require_dense().to(device)
    if task == "cls":
        train_ds = D.ClassificationDataset(train_src, True, enc.image_size, enc.mean, enc.std)
        val_ds = D.ClassificationDataset(val_src, False, enc.image_size, enc.mean, enc.std)
    else:
        train_ds = D.DenseDataset(train_src, task, True, cfg.data, enc.mean, enc.std)
        val_ds = D.DenseDataset(val_src, task, False, cfg.data, enc.mean, enc.std)
    torch.manual_seed(cfg.run.seed)  # identical head init on every rank
    h = cfg.head_cfg
    if task == "cls":
        head = build_linear_classifier(enc.embed_dim, train_src.num_classes)
    else:
        out_ch = train_src.num_classes if task == "seg" else OUT_CHANNELS[task]
        head = build_dense_head(head_kind, enc.dense_channels, out_ch, h.channels, h.atrous_rates, h.pool_sizes, h.dropout)
    head.to(device)
    ddp_head = DDP(head, device_ids=[local_rank] if device.type == "cuda" else None) if distributed else head
    o = cfg.optim
    optimizer = torch.optim.AdamW(param_groups(head, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    steps_per_epoch = len(train_ds) // (cfg.data.batch_size * world)
    if steps_per_epoch == 0:
        raise ConfigError(f"the training split has {len(train_ds)} items, fewer than one global batch "
                          f"({cfg.data.batch_size} x {world} ranks); lower data.batch_size")
    total_steps = o.steps or o.epochs * steps_per_epoch

    # ---- run directory and resume ------------------------------------------------------------
    encoder_info = describe(enc)
    run_dir = Path(args.run_dir or Path("runs/probe") / encoder_info["name"] / f"{train_src.name}-{task}-{head_kind}")
    resume_path = ckpt.find(run_dir, args.resume) if args.resume else None
    if not args.resume and ckpt.has_checkpoints(run_dir):
        raise ConfigError(f"{run_dir} already holds a probe run; continue it with --resume latest or use another --run-dir")
    start_step = 0
    if resume_path:
        state = ckpt.load(resume_path)
        saved = state["config"]
        same = {k: saved.get(k) == v for k, v in (("task", task), ("head", head_kind),
                                                   ("head_cfg", cfg.to_dict()["head_cfg"]))}
        if not all(same.values()) or state["arch"].get("source") != encoder_info["source"]:
            raise ckpt.CheckpointError(f"{resume_path} was made for another probe (task/head/head config/encoder "
                                       f"{saved.get('task')}/{saved.get('head')}/{state['arch'].get('source')})")
        head.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step = state["step"]
        if state["data"].get("world_size") == world:
            ckpt.set_rng_state(state["rng"][rank])
        log.info("resumed from %s at step %d", resume_path, start_step)
    metrics_path, log_path = run_dir / "metrics.json", run_dir / "train.jsonl"
    if start_step >= total_steps and metrics_path.is_file():
        if main_proc:
            log.info("nothing to do: %s is complete (%d steps); its metrics: %s", run_dir, start_step, metrics_path)
        return 0
    if main_proc:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.truncate_metrics(log_path, start_step)
        write_text_atomic(run_dir / "config.yaml", __import__("yaml").safe_dump(cfg.to_dict(), sort_keys=False))
        log.info("%s: %s/%s on %s %s (%d train, %d val items), encoder %s, %d steps (%d/epoch), world %d, %s",
                 run_dir, task, head_kind, train_src.name, train_src.split, len(train_ds), len(val_ds),
                 encoder_info["name"], total_steps, steps_per_epoch, world, precision)
    if distributed:
        dist.barrier()

    # ---- the loop ------------------------------------------------------------------------------
    from tqdm import tqdm

    scaler = torch.amp.GradScaler(device.type, enabled=False)  # bf16 needs none; the checkpoint keeps a slot
    pbar = tqdm(total=total_steps, initial=start_step, disable=not main_proc, dynamic_ncols=True, mininterval=1.0)
    step = start_step
    stop = cfg.run.stop_after
    ddp_head.train()
    while step < total_steps and not (stop and step >= stop):
        epoch, skip = divmod(step, steps_per_epoch)
        sampler = EpochSampler(len(train_ds), cfg.data.batch_size, rank, world, cfg.run.seed, epoch, skip)
        loader = torch.utils.data.DataLoader(train_ds, batch_size=cfg.data.batch_size, sampler=sampler, drop_last=True,
                                             num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda",
                                             generator=torch.Generator())  # worker seeds off the global RNG
        for b in loader:
            lr = lr_at(step, o, total_steps)
            for g in optimizer.param_groups:
                g["lr"] = lr
            images = b["image"].to(device, non_blocking=True)
            target = b["target"].to(device, non_blocking=True)
            with autocast:
                out = _forward(task, enc, ddp_head, images, tuple(images.shape[-2:]))
            loss = _loss(task, out, target, cfg.eval)
            mean_loss = _all_mean(loss.detach().float()[None], distributed, world)
            if not torch.isfinite(mean_loss).all():
                if main_proc:
                    print(f"error: non-finite loss at step {step + 1}; stopping. Resume with --resume latest, "
                          f"e.g. with a lower optim.lr", file=sys.stderr, flush=True)
                pbar.close()
                return EXIT_NONFINITE
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if o.grad_clip:
                torch.nn.utils.clip_grad_norm_(head.parameters(), o.grad_clip)
            optimizer.step()
            step += 1
            if main_proc and (step % cfg.run.log_every == 0 or step == total_steps):
                with open(log_path, "a") as f:
                    f.write(json.dumps({"step": step, "epoch": round(step / steps_per_epoch, 4), "lr": lr,
                                        "loss": mean_loss.item()}) + "\n")
                pbar.set_postfix(loss=f"{mean_loss.item():.4f}", lr=f"{lr:.2e}", refresh=False)
            pbar.update(1)
            if step % cfg.run.ckpt_every == 0 or step == total_steps:
                ckpt.save(run_dir, step, distributed=distributed, main=main_proc, model=head, optimizer=optimizer,
                          scaler=scaler, config=cfg.to_dict(), arch=encoder_info,
                          data={"world_size": world, "positions": [], "seed": cfg.run.seed},
                          keep=cfg.run.keep_checkpoints)
            if step >= total_steps or (stop and step >= stop):
                break
    pbar.close()
    if step < total_steps:
        log.info("stopped after step %d of %d (run.stop_after); continue with --resume latest", step, total_steps)
        return 0

    # ---- evaluation ----------------------------------------------------------------------------
    if distributed:  # batch-norm statistics: DDP broadcasts rank 0's before each forward, so after the last
        for buf in head.buffers():  # step every rank holds its own; evaluate with rank 0's (the checkpoint's)
            dist.broadcast(buf, 0)
    metrics = evaluate(task, enc, head, val_ds, cfg, rank, world, device, autocast, progress=main_proc)
    if main_proc:
        main_metric = MAIN_METRIC[task]
        record = {"task": task, "head": head_kind, "dataset": val_src.name, "split": val_src.split,
                  "metric": main_metric, "value": metrics[main_metric], "metrics": metrics,
                  "encoder": encoder_info, "train": {"dataset": train_src.name, "split": train_src.split,
                                                     "items": len(train_ds), "missing_labels": train_src.missing_labels},
                  "val_items": len(val_ds), "val_missing_labels": val_src.missing_labels,
                  "steps": total_steps, "world_size": world, "precision": precision, "config": cfg.to_dict()}
        write_text_atomic(metrics_path, json.dumps(record, indent=1, allow_nan=True) + "\n")
        summary = {k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v)
                   for k, v in metrics.items() if not isinstance(v, dict)}
        print(json.dumps({"run": str(run_dir), "task": task, "head": head_kind, "dataset": val_src.name,
                          **summary}), flush=True)
    if distributed:
        dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
