#!/usr/bin/env bash
# The GPU benchmark (G1-G4, the option variants, a profile) on a CUDA machine without the
# project's venv and without Ray: `bash bench/gpu_run.sh` from the repository root.
#
# Needs on PYTHONPATH (besides torch, torchvision, transformers): zstandard, geffnet, Pillow,
# numpy (e.g. `pip install --no-deps --target /tmp/site zstandard geffnet` and
# PYTHONPATH=/tmp/site). Needs data/sample/ (gitignored: copy it along; rebuilding it needs
# scikit-image's sample data, which downloads). Writes under $OUT (default bench/gpu-run):
# results.json (also the partial results if the run is cut short), log.txt, profile.txt, env.txt.
# The run stops itself after $LIMIT seconds (default 540). Arguments choose benchmarks (default all: G1 G2 G3 G4).
set -u
OUT=${OUT:-bench/gpu-run}
LIMIT=${LIMIT:-540}
PY=${PYTHON:-$(command -v python3 || command -v python)}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export BENCH_RESULTS="$OUT/results.json" BENCH_PROFILE="${BENCH_PROFILE-$OUT/profile.txt}" BENCH_SAMPLE=${BENCH_SAMPLE:-data/sample}

{
  echo "== $(date -u +%FT%TZ) on $(hostname), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true
  "$PY" - <<'EOF'
import importlib
for m in ("torch", "torchvision", "transformers", "zstandard", "geffnet", "PIL", "numpy"):
    try:
        mod = importlib.import_module(m)
        print(f"{m} {getattr(mod, '__version__', '?')}")
    except Exception as e:  # report every missing module at once
        print(f"MISSING {m}: {e}")
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
if grep -q '^MISSING' "$OUT/env.txt"; then
  echo "missing modules (see above): install them on PYTHONPATH first" | tee "$OUT/log.txt"
  exit 2
fi
if [ ! -f "$BENCH_SAMPLE/00000.tar" ]; then
  echo "no $BENCH_SAMPLE/00000.tar: copy data/sample along (python -m pipeline.sample builds it where scikit-image can download)" | tee "$OUT/log.txt"
  exit 2
fi

timeout --signal=INT --kill-after=20 "$LIMIT" "$PY" -m bench.run --device cuda "$@" 2>&1 | tee "$OUT/log.txt"
rc=${PIPESTATUS[0]}
echo "exit code $rc" | tee -a "$OUT/log.txt"
exit "$rc"
