"""CLIPTeX training: CLIP + PSP + task heads on image-text shards and offline pseudo-labels.

    torchrun --standalone --nproc_per_node=2 -m trainer.train --shards sample --labels data/labels/sample \
        --profile smoke [--steps N] [--tasks seg,depth|none] [--run-dir DIR] [--resume latest] [--export]

``--shards``, ``--labels`` and ``--run-dir`` are locations: local paths or URLs (``s3://…``, ``gs://…``;
docs/STORAGE.md). An unreadable bucket, a bad manifest or config: one ``error:`` line, exit 2.

Read top to bottom: arguments and config -> distributed setup -> data -> model, optimizer -> resume ->
the loop (forward, loss, NaN guard, backward, clip, step, log, checkpoint) -> export. gloo on CPU,
NCCL on CUDA; one process per GPU; multi-node through torchrun's rendezvous flags (docs/TRAINING.md).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from pipeline import storage
from pipeline.manifest import ManifestError
from trainer import checkpoint as ckpt
from trainer import data as D
from trainer import params
from trainer.losses import CLIPTeXLoss
from trainer.distributed import process_group
from trainer.model import PretrainedUnavailable, build_model, compile_dense

log = logging.getLogger("trainer")
EXIT_CONFIG, EXIT_NONFINITE = 2, 3


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainer.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", default="sample", help="manifest name (manifests/<name>.yaml), folder / prefix of .tar "
                   "shards or brace pattern; local or a URL (s3://bucket/cc3m/{00000..00331}.tar)")
    p.add_argument("--labels", default=None, help="label root with <task>/<shard>.tar, a folder or a URL "
                   "(default: the manifest's output)")
    p.add_argument("--profile", default="default", help="trainer/configs/<profile>.yaml (default | smoke)")
    p.add_argument("--config", default=None, help="a YAML config file (overrides --profile)")
    p.add_argument("--tasks", default=None, help="comma list of seg,depth,normal; 'none' = CLIP-FT baseline; 'all'")
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps (overrides optim.epochs)")
    p.add_argument("--arch", default=None, help="open_clip model name (model.arch)")
    p.add_argument("--pretrained", default=None, help="open_clip tag or local checkpoint file (model.pretrained); 'none' = random")
    p.add_argument("--run-dir", default=None, help="a folder or a URL (default: runs/<shards>-<profile>-<tasks>)")
    p.add_argument("--resume", default=None, help="'latest' (of --run-dir) or a checkpoint path")
    p.add_argument("--export", action="store_true", help="export the open_clip model to <run-dir>/export at the end")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. optim.lr=1e-4")
    return p.parse_args(argv)


def lr_at(step: int, o: params.OptimCfg, total: int) -> float:
    """Linear warmup from warmup_init_lr to lr, then cosine to min_lr (Table 8)."""
    if step < o.warmup_steps:
        return o.warmup_init_lr + (o.lr - o.warmup_init_lr) * step / o.warmup_steps
    t = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * t))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """open_clip's rule: no weight decay on gains, biases, norms and the temperature."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n or ".norm" in n
        (no_decay if skip else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def main(argv=None) -> int:
    args = parse_args(argv)
    # open_clip's ClipLoss still calls torch.distributed.nn.all_gather (autograd-aware, what we want)
    warnings.filterwarnings("ignore", message=".*all_gather is deprecated.*", category=FutureWarning)
    with process_group(log) as r:
        try:
            return _train(args, r.distributed, r.rank, r.world, r.local_rank, r.device, r.main)
        except (params.ConfigError, D.DataError, ManifestError, storage.StorageError, PretrainedUnavailable,
                ckpt.CheckpointError) as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return EXIT_CONFIG


def _train(args, distributed, rank, world, local_rank, device, main_proc) -> int:
    cuda = device.type == "cuda"

    # ---- config --------------------------------------------------------------------------------
    overrides = list(args.set)
    cfg = params.load_config(args.profile, args.config, overrides)
    if args.tasks is not None:
        cfg.tasks = params.parse_tasks(args.tasks)
    if args.steps is not None:
        cfg.optim.steps = args.steps
    if args.arch:
        cfg.model.arch = args.arch
    if args.pretrained:
        cfg.model.pretrained = None if args.pretrained.lower() in ("none", "null", "random") else args.pretrained
    params.validate(cfg)
    precision = cfg.run.precision if cfg.run.precision != "auto" else ("bf16" if cuda else "fp32")

    # ---- data ----------------------------------------------------------------------------------
    name, shards, expected, manifest_out = D.resolve_shards(args.shards)
    label_root = args.labels or manifest_out
    shards, label_tars, excluded = D.label_files(label_root, cfg.tasks, shards)
    if excluded:
        log.warning("%d shard(s) have no label tars for %s and are left out: %s", len(excluded), cfg.tasks,
                    ", ".join(excluded[:10]) + (" ..." if len(excluded) > 10 else ""))
    num_samples = cfg.data.num_samples or expected or D.count_samples(shards)
    steps_per_epoch = max(1, math.ceil(num_samples / (cfg.data.batch_size * world)))
    total_steps = cfg.optim.steps or cfg.optim.epochs * steps_per_epoch
    num_streams = max(1, cfg.data.num_workers)

    profile = Path(args.config).stem if args.config else args.profile
    run_dir = storage.normalize(args.run_dir or f"runs/{name}-{profile}-{'+'.join(cfg.tasks) or 'clipft'}")
    if main_proc:
        storage.check_writable(run_dir)  # a missing bucket or no permission: before any work
    resume_path = ckpt.find(run_dir, args.resume) if args.resume else None
    if not args.resume and ckpt.has_checkpoints(run_dir):
        raise params.ConfigError(f"{storage.redact(run_dir)} already holds a run; continue it with --resume latest "
                                 f"or start another with --run-dir")

    # ---- model, loss, optimizer ----------------------------------------------------------------
    torch.manual_seed(cfg.run.seed)  # identical init on every rank (DDP also broadcasts rank 0's)
    state = ckpt.load(resume_path) if resume_path else None  # weights come from it: no download, no hub
    with ckpt.rank0_first(distributed, local_rank == 0):
        model, model_cfg, preprocess = build_model(cfg, saved=state and state["arch"])
    model.to(device)
    mean = torch.tensor(preprocess["mean"], device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(preprocess["std"], device=device).view(1, 3, 1, 1) * 255
    ddp_model = DDP(model, device_ids=[local_rank] if cuda else None) if distributed else model
    criterion = CLIPTeXLoss(vars(cfg.loss), cfg.tasks, rank, world, cfg.loss.normal_kappa_weight)
    if cfg.model.compile_dense:
        compile_dense(model, criterion)
    o = cfg.optim
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
                if precision in ("bf16", "fp16") else contextlib.nullcontext())

    # ---- resume --------------------------------------------------------------------------------
    start_step, positions, data_seed = 0, None, cfg.run.seed
    skip_totals = torch.zeros(len(D.REASONS), dtype=torch.float64)
    if state:
        ckpt.check_compatible(state["config"], cfg.to_dict())
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_step = state["step"]
        dstate = state["data"]
        skip_totals = torch.tensor([dstate["skips"].get(r, 0) for r in D.REASONS], dtype=torch.float64)
        if dstate["world_size"] == world and dstate["num_streams"] == num_streams:
            positions, data_seed = dstate["positions"][rank], dstate["seed"]
            ckpt.set_rng_state(state["rng"][rank])
        else:
            data_seed = cfg.run.seed + 1_000_003 * start_step  # fresh streams, not a replay of the start
            log.warning("resuming with %d ranks x %d workers (checkpoint: %d x %d): the data order differs "
                        "from an uninterrupted run", world, num_streams, dstate["world_size"], dstate["num_streams"])
        log.info("resumed from %s at step %d", storage.redact(resume_path), start_step)
    else:
        torch.manual_seed(cfg.run.seed * 1000 + rank)  # per-rank dropout streams
        random.seed(cfg.run.seed * 1000 + rank)
    if start_step >= total_steps:
        log.info("nothing to do: the run is at step %d of %d", start_step, total_steps)
        return 0

    dataset = D.TrainStream(shards, label_tars, cfg.tasks, cfg.data, seed=data_seed, rank=rank, world_size=world,
                            num_streams=num_streams, start_step=start_step, positions=positions,
                            arch=cfg.model.arch, model_config_dir=cfg.model.model_config_dir,
                            kappa=cfg.loss.normal_kappa_weight)
    loader = D.make_loader(dataset, cfg.data.num_workers, pin_memory=cuda, prefetch_factor=cfg.data.prefetch_factor)
    stream_pos = [list(p) for p in (positions or [(0, 0)] * num_streams)]

    # ---- run directory -------------------------------------------------------------------------
    # metrics and TensorBoard events are appended to: in a local folder (the run directory itself,
    # or, for a bucket, a scratch folder uploaded with every checkpoint)
    local_dir = ckpt.local_run_dir(run_dir)
    metrics_path = os.path.join(local_dir, "metrics.jsonl")
    writer = None
    if main_proc:
        os.makedirs(local_dir, exist_ok=True)
        if state:
            ckpt.fetch_run_file(run_dir, "metrics.jsonl")
        ckpt.truncate_metrics(metrics_path, start_step)
        storage.write_text_atomic(storage.join(run_dir, "config.yaml"),
                                  params.yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        storage.write_text_atomic(storage.join(run_dir, "run.json"), json.dumps({
            "shards": storage.redact(args.shards), "labels": storage.redact(label_root) if cfg.tasks else None,
            "num_shards": len(shards),
            "excluded_shards": excluded, "num_samples": num_samples, "world_size": world,
            "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "precision": precision,
            "model_cfg": model_cfg, "preprocess": preprocess}, indent=1, default=list))
        if cfg.run.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(os.path.join(local_dir, "tb"), purge_step=start_step + 1)
        log.info("%s: %d shards, %d samples/epoch, %d steps (%d/epoch), world %d, tasks %s, %s, %s",
                 storage.redact(run_dir), len(shards), num_samples, total_steps, steps_per_epoch, world, cfg.tasks or "none (CLIP-FT)",
                 cfg.model.arch, precision)
    if distributed:
        dist.barrier()

    # ---- the loop ------------------------------------------------------------------------------
    from tqdm import tqdm

    term_names = ["clip"] + list(cfg.tasks)
    label_kinds = [k for t in cfg.tasks for k in dataset.kinds[t]]
    last_ckpt = resume_path
    pbar = tqdm(total=total_steps, initial=start_step, disable=not main_proc, dynamic_ncols=True, mininterval=1.0)
    batches = iter(loader)
    model.train()
    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        lr = lr_at(step, o, total_steps)
        for g in optimizer.param_groups:
            g["lr"] = lr
        batch = next(batches)
        data_time = time.perf_counter() - t0  # waiting on the loader (open_clip's data_time)
        assert batch["step"] == step, (batch["step"], step)
        images = (batch["image"].to(device, non_blocking=True).permute(0, 3, 1, 2).float().contiguous() - mean) / std
        texts = batch["text"].to(device, non_blocking=True)
        targets = D.labels_to_values(batch, label_kinds, device)
        if "normal" in targets:
            targets["normal"] = targets["normal"].permute(0, 3, 1, 2)  # (B, H, W, 3) -> (B, 3, H, W)

        with autocast:
            out = ddp_model(images, texts)
        loss, terms = criterion(out, targets)
        if cfg.run.nan_at_step == step + 1:
            loss = loss * float("nan")  # fault injection (tests): the guard below must stop the run

        # every rank learns whether any rank's loss is non-finite, and the global means for logging
        stats = torch.stack([loss.detach().float()] + [terms[k].detach().float() for k in term_names])
        vec = torch.cat([stats.cpu().double(), torch.isfinite(stats).all().double().cpu()[None],
                         batch["skips"].double()])
        if distributed:
            vec = vec.to(device)
            dist.all_reduce(vec)
            vec = vec.cpu()
        n = len(stats)
        if vec[n].item() < world:
            bad = {k: round(v.item() / world, 6) for k, v in zip(["loss"] + term_names, vec[:n])}
            msg = (f"non-finite loss at step {step + 1} (rank means: {bad}); stopping without saving. "
                   f"Last good checkpoint: {storage.redact(last_ckpt) if last_ckpt else 'none'}. Resume with --resume latest, e.g. with a lower optim.lr.")
            if main_proc:
                print(f"error: {msg}", file=sys.stderr, flush=True)
            pbar.close()
            return EXIT_NONFINITE
        means = (vec[:n] / world).tolist()
        skip_totals += vec[n + 1:]

        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        if not torch.isfinite(grad_norm) and precision != "fp16":
            if main_proc:
                print(f"error: non-finite gradient norm at step {step + 1}; stopping without saving. "
                      f"Last good checkpoint: {storage.redact(last_ckpt) if last_ckpt else 'none'}.", file=sys.stderr, flush=True)
            pbar.close()
            return EXIT_NONFINITE
        scaler.step(optimizer)
        scaler.update()
        with torch.no_grad():
            model.clip.logit_scale.clamp_(0, math.log(100))  # open_clip's temperature clamp
        stream_pos[batch["stream"]] = list(batch["pos"])
        done = step + 1

        # ---- log
        if main_proc and (done % cfg.run.log_every == 0 or done == total_steps):
            step_time = time.perf_counter() - t0
            h, w = batch["image"].shape[1:3]
            rec = {"step": done, "epoch": round(done / steps_per_epoch, 4), "lr": lr, "loss": means[0],
                   **{f"loss_{k}": v for k, v in zip(term_names, means[1:])},
                   "logit_scale": model.clip.logit_scale.exp().item(), "grad_norm": grad_norm.item(),
                   "batch_size": batch["image"].shape[0] * world, "resolution": [h, w],
                   "samples_per_s": round(batch["image"].shape[0] * world / step_time, 2),
                   "data_time": round(data_time, 4), "step_time": round(step_time, 4),
                   "skipped": {r: int(v) for r, v in zip(D.REASONS, skip_totals.tolist()) if v}}
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if writer:
                for k in ("loss", *[f"loss_{t}" for t in term_names], "lr", "logit_scale", "grad_norm", "samples_per_s",
                          "data_time", "step_time"):
                    writer.add_scalar(f"train/{k}", rec[k], done)
            pbar.set_postfix(loss=f"{means[0]:.4f}", lr=f"{lr:.2e}", res=f"{h}x{w}", refresh=False)
        pbar.update(1)

        # ---- checkpoint
        if done % cfg.run.ckpt_every == 0 or done == total_steps:
            last_ckpt = ckpt.save(run_dir, done, distributed=distributed, main=main_proc, model=model,
                                  optimizer=optimizer, scaler=scaler, config=cfg.to_dict(),
                                  arch={"model_cfg": model_cfg, "preprocess": preprocess},
                                  data={"world_size": world, "num_streams": num_streams, "seed": data_seed,
                                        "positions": stream_pos,
                                        "skips": {r: v for r, v in zip(D.REASONS, skip_totals.tolist()) if v}},
                                  keep=cfg.run.keep_checkpoints, local_dir=local_dir)
    pbar.close()
    if writer:
        writer.close()
    if main_proc:
        ckpt.sync_run_files(local_dir, run_dir)  # the last metrics and events, after the writer closed

    # ---- export ----------------------------------------------------------------------------------
    if args.export and main_proc:
        from trainer.export import export

        paths = export(model, model_cfg, preprocess, cfg.model.arch, storage.join(run_dir, "export"))
        log.info("exported: %s", ", ".join(storage.redact(p) for p in paths.values()))
    if distributed:
        dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
