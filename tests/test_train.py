"""End-to-end trainer tests (CPU, smoke profile, labels made by the pipeline's smoke profile).

Real torchrun subprocesses (gloo, 2 ranks), a real SIGKILL, real open_clip loading of the export.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.storage import write_tar_atomic

REPO = Path(__file__).resolve().parent.parent
STEPS = 50
COMPARED = ("loss", "loss_clip", "loss_seg", "loss_depth", "loss_normal", "lr", "grad_norm", "logit_scale",
            "batch_size", "resolution", "skipped", "epoch")


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _torchrun(sample_dir, labels, run_dir, *extra, steps=STEPS):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "trainer.train", "--shards", str(sample_dir), "--labels", str(labels), "--profile", "smoke",
            "--steps", str(steps), "--run-dir", str(run_dir), *extra]


def _metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _tree(pid):
    """pid and all its descendants (torchrun starts each rank in its own session)."""
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


@pytest.fixture(scope="module")
def reference_run(sample_dir, smoke_labels, tmp_path_factory):
    """One uninterrupted 2-rank run of STEPS steps (checkpoint every 10), exported at the end."""
    run = tmp_path_factory.mktemp("train") / "ref"
    t0 = time.time()
    p = subprocess.run(_torchrun(sample_dir, smoke_labels, run, "--export"), cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-4000:]
    print(f"reference run: {time.time() - t0:.1f} s")
    return run


@pytest.mark.timeout(600)
def test_ddp_loss_decreases(reference_run):
    m = _metrics(reference_run)
    assert [r["step"] for r in m] == list(range(1, STEPS + 1))
    assert all(np.isfinite(r["loss"]) for r in m)
    first = np.mean([r["loss"] for r in m[:10]])
    last = np.mean([r["loss"] for r in m[-10:]])
    assert last < 0.8 * first, (first, last)
    for term in ("loss_seg", "loss_depth", "loss_normal"):  # every dense head learns
        assert np.mean([r[term] for r in m[-10:]]) < np.mean([r[term] for r in m[:10]]), term
    assert {tuple(r["resolution"]) for r in m} == {(64, 64), (96, 96), (128, 128)}  # variable resolution
    assert all(r["batch_size"] % 2 == 0 for r in m)  # the same batch on both ranks
    assert m[0]["lr"] == pytest.approx(1e-5) and m[-1]["lr"] < m[10]["lr"]  # warmup then cosine
    assert (reference_run / "tb").is_dir() and any((reference_run / "tb").iterdir())
    ckpts = sorted((reference_run / "checkpoints").glob("step_*.pt"))
    assert [c.name for c in ckpts] == ["step_00000040.pt", "step_00000050.pt"]  # keep_checkpoints: 2
    assert (reference_run / "checkpoints" / "latest").read_text().strip() == "step_00000050.pt"


@pytest.mark.timeout(600)
def test_kill_and_resume_reproduces_the_run(reference_run, sample_dir, smoke_labels, tmp_path):
    run = tmp_path / "killed"
    p = subprocess.Popen(_torchrun(sample_dir, smoke_labels, run), cwd=REPO, env=_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    latest = run / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.exists():
        assert p.poll() is None, p.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.02)
    for pid in _tree(p.pid):  # a hard crash: every process of the job, no cleanup
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    p.wait(timeout=30)
    time.sleep(1.0)  # let orphaned DataLoader workers notice their parent is gone
    k = int(latest.read_text().strip()[5:13])
    assert k < STEPS, "the run finished before it could be killed"
    done_before = len(_metrics(run))

    r = subprocess.run(_torchrun(sample_dir, smoke_labels, run, "--resume", "latest"), cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-4000:]
    assert f"resumed from {run / 'checkpoints' / f'step_{k:08d}.pt'} at step {k}" in r.stderr
    ref, got = _metrics(reference_run), _metrics(run)
    assert [x["step"] for x in got] == list(range(1, STEPS + 1)), (k, done_before)  # no duplicated steps
    for a, b in zip(ref[k:], got[k:]):
        assert {c: a[c] for c in COMPARED} == {c: b[c] for c in COMPARED}, a["step"]


@pytest.mark.timeout(600)
def test_export_loads_in_open_clip_with_the_same_embeddings(reference_run, tmp_path):
    import open_clip

    from trainer import checkpoint as ckpt
    from trainer import params
    from trainer.model import build_model, register_model_configs

    register_model_configs()
    state = ckpt.load(ckpt.find(reference_run, "latest"))
    assert state["step"] == STEPS
    cfg = params.from_dict(state["config"])
    trained, _, _ = build_model(cfg, saved=state["arch"])
    trained.load_state_dict(state["model"])
    trained.eval()
    export = reference_run / "export"
    info = json.loads((export / "export.json").read_text())
    size = info["image_size"]
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    text = open_clip.get_tokenizer(info["arch"])(["a cat", "a dog", "a red car"])
    with torch.no_grad():
        want_img = trained.encode_image(x)[0]
        want_txt = trained.clip.encode_text(text, normalize=True)

    sd = torch.load(export / "open_clip_pytorch_model.bin", weights_only=True)
    assert not any(k.startswith(("psp.", "heads.")) for k in sd) and any(k.startswith("visual.") for k in sd)
    full = open_clip.create_model(info["arch"], pretrained=str(export / "open_clip_pytorch_model.bin")).eval()
    local = open_clip.create_model(f"local-dir:{export}").eval()
    image_only = open_clip.create_model(info["arch"], pretrained_image_path=str(export / "image_encoder.pt")).eval()
    fresh = open_clip.create_model(info["arch"]).eval()
    with torch.no_grad():
        for m in (full, local, image_only):
            torch.testing.assert_close(m.encode_image(x, normalize=True), want_img, rtol=0, atol=1e-6)
        for m in (full, local):
            torch.testing.assert_close(m.encode_text(text, normalize=True), want_txt, rtol=0, atol=1e-6)
        assert (fresh.encode_image(x, normalize=True) - want_img).abs().max() > 1e-3  # the test can fail

    # the standalone exporter (from the run's latest checkpoint) writes the same weights
    from trainer.export import main as export_main

    assert export_main(["--run-dir", str(reference_run), "--out", str(tmp_path / "again")]) == 0
    again = torch.load(tmp_path / "again" / "open_clip_pytorch_model.bin", weights_only=True)
    assert again.keys() == sd.keys() and all(torch.equal(again[k], sd[k]) for k in sd)


# ---- in-process runs (one process, no torchrun): task subsets, skipped keys, NaN guard ----------

def _run_inprocess(sample_dir, labels, run_dir, *extra, steps=2):
    from trainer.train import main

    return main(["--shards", str(sample_dir), "--labels", str(labels), "--profile", "smoke", "--steps", str(steps),
                 "--run-dir", str(run_dir), "--set", "data.num_workers=0", "--set", "run.tensorboard=false", *extra])


SUBSETS = [("none", []), ("seg", []), ("depth", []), ("normal", []), ("seg,depth", []), ("seg,normal", []),
           ("depth,normal", []), ("seg,depth,normal", []),
           ("seg,depth,normal", ["--set", "model.head_layers=3"]),            # Table 6 heavy heads
           ("seg,depth,normal", ["--arch", "CLIPTeX-Tiny-RN"]),              # ResNet tower (last stage)
           ("normal", ["--set", "loss.normal_kappa_weight=true"])]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tasks,extra", SUBSETS, ids=[f"{t}{'+' + e[-1] if e else ''}" for t, e in SUBSETS])
def test_every_task_subset_runs(tasks, extra, sample_dir, smoke_labels, tmp_path):
    selected = [] if tasks == "none" else tasks.split(",")
    labels = tmp_path / "labels"  # only the selected trees exist: the others must not be needed
    labels.mkdir()
    for t in selected:
        (labels / t).symlink_to(Path(smoke_labels) / t, target_is_directory=True)
    rc = _run_inprocess(sample_dir, labels, tmp_path / "run", "--tasks", tasks, *extra, steps=2)
    assert rc == 0
    m = _metrics(tmp_path / "run")
    assert len(m) == 2
    for t in ("seg", "depth", "normal"):
        assert (f"loss_{t}" in m[-1]) == (t in selected)
    assert all(np.isfinite(v) for r in m for k, v in r.items() if k.startswith("loss"))
    state = torch.load(tmp_path / "run" / "checkpoints" / "step_00000002.pt", weights_only=True)
    assert any(k.startswith("psp.") for k in state["model"]) == bool(selected)
    assert {k.split(".")[1] for k in state["model"] if k.startswith("heads.")} == set(selected)



@pytest.mark.timeout(300)
def test_kappa_weight_reaches_the_normal_loss(sample_dir, smoke_labels, tmp_path):
    """loss.normal_kappa_weight=true: the loader reads normal_conf and the loss weights by it. The
    smoke expert's kappa is nearly uniform, so the labels get one that is not (1/100 on each map's
    left half, 100 on its right). The first step sees the same model and batch either way, so only
    the weighting can change its normal loss; a batch without normal_conf stops the run."""
    from pipeline import labels as L

    labels = tmp_path / "labels"
    (labels / "normal").mkdir(parents=True)
    for tar in sorted((Path(smoke_labels) / "normal").glob("*.tar")):
        members = []
        for name, data in _members(tar):
            if L.split_member_name(name)[1] == "normal_conf":
                header, kappa = L.decode_with_header(data)
                kappa = np.where(np.arange(kappa.shape[1]) < kappa.shape[1] // 2, 0.01, 100.0)[None].repeat(kappa.shape[0], 0)
                data = L.encode("normal_conf", kappa.astype(np.float32), image_size=tuple(header["image_size"]))
            members.append((name, data))
        write_tar_atomic(labels / "normal" / tar.name, members)
    first = {}
    for kappa in ("false", "true"):
        rc = _run_inprocess(sample_dir, labels, tmp_path / kappa, "--tasks", "normal",
                            "--set", f"loss.normal_kappa_weight={kappa}", steps=1)
        assert rc == 0
        first[kappa] = _metrics(tmp_path / kappa)[0]
    assert first["true"]["loss_clip"] == first["false"]["loss_clip"]  # the same model and batch
    assert abs(first["true"]["loss_normal"] / first["false"]["loss_normal"] - 1) > 0.01, first


@pytest.mark.timeout(300)
def test_metrics_split_each_step_into_data_wait_and_the_rest(sample_dir, smoke_labels, tmp_path, monkeypatch):
    """data_time is the time spent waiting for the loader, step_time the whole step (open_clip's
    data_time / batch_time). The trainer's clock is replaced by one that only moves when the loader
    hands over batch i (by 2 + i) and when the loss is computed (by 0.25)."""
    import types

    import trainer.train as T
    from trainer import data as D

    clock = [1000.0]
    monkeypatch.setattr(T, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    make_loader = D.make_loader

    def waiting_loader(*args, **kwargs):
        loader = make_loader(*args, **kwargs)

        class Waiting:
            def __iter__(self):
                for i, batch in enumerate(loader):
                    clock[0] += 2 + i
                    yield batch
        return Waiting()

    class TimedLoss(T.CLIPTeXLoss):
        def forward(self, out, batch):
            clock[0] += 0.25
            return super().forward(out, batch)

    monkeypatch.setattr(D, "make_loader", waiting_loader)
    monkeypatch.setattr(T, "CLIPTeXLoss", TimedLoss)
    assert _run_inprocess(sample_dir, smoke_labels, tmp_path / "run", steps=3) == 0
    m = _metrics(tmp_path / "run")
    assert [r["data_time"] for r in m] == [2, 3, 4]
    assert [r["step_time"] for r in m] == [2.25, 3.25, 4.25]
    assert [r["samples_per_s"] for r in m] == [round(r["batch_size"] / r["step_time"], 2) for r in m]

def _members(path):
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


@pytest.mark.timeout(300)
def test_missing_and_mismatched_label_keys_are_skipped_and_counted(sample_dir, smoke_labels, tmp_path):
    labels = tmp_path / "labels"
    shutil.copytree(smoke_labels, labels)
    shard = sorted(Path(sample_dir).glob("*.tar"))[1].name
    depth = _members(labels / "depth" / shard)
    keys = sorted({n.split(".")[0] for n, _ in depth})
    write_tar_atomic(labels / "depth" / shard, [(n, b) for n, b in depth if not n.startswith(keys[0] + ".")])
    seg = _members(labels / "seg" / shard)
    write_tar_atomic(labels / "seg" / shard, [((n.replace(keys[1], "x" + keys[1][1:]) if n.startswith(keys[1] + ".")
                                               else n), b) for n, b in seg])
    # not resampled, one stream: both shards are read in the first chunk, so 6 steps consume all of it
    rc = _run_inprocess(sample_dir, labels, tmp_path / "run", "--set", "data.resampled=false", steps=6)
    assert rc == 0
    skipped = _metrics(tmp_path / "run")[-1]["skipped"]
    assert skipped.get("missing_depth", 0) >= 1 and skipped.get("missing_seg", 0) >= 1
    assert skipped.get("extra_seg", 0) >= 1 and skipped.get("samples_skipped", 0) >= 2
    assert set(skipped) <= {"missing_depth", "missing_seg", "extra_seg", "samples_skipped"}, skipped


@pytest.mark.timeout(300)
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(sample_dir, smoke_labels, tmp_path, capsys):
    run = tmp_path / "run"
    rc = _run_inprocess(sample_dir, smoke_labels, run, "--set", "run.ckpt_every=2", "--set", "run.nan_at_step=5",
                        steps=10)
    assert rc == 3
    assert "non-finite loss at step 5" in capsys.readouterr().err
    assert [r["step"] for r in _metrics(run)] == [1, 2, 3, 4]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000004.pt"
    # the run continues from the last good checkpoint once the cause is gone
    assert _run_inprocess(sample_dir, smoke_labels, run, "--resume", "latest", "--set", "run.ckpt_every=2",
                          steps=6) == 0
    assert [r["step"] for r in _metrics(run)] == [1, 2, 3, 4, 5, 6]
    # and a second run into the same directory without --resume is refused, not overwritten
    assert _run_inprocess(sample_dir, smoke_labels, run) == 2
