#!/usr/bin/env bash
# The CUDA benchmarks, in one short run (under 5 minutes on an H100) on a machine with an NVIDIA GPU:
#
#   bash benchmarks/gpu.sh                         # from the repository root; results in benchmarks/results/gpu/
#   WHEELS=/tmp/whl bash benchmarks/gpu.sh         # offline: onnxruntime-gpu (and pyspng) from a folder of wheels
#
# 1. onnxruntime-gpu goes into a folder of its own ($SITE) put first on PYTHONPATH, where it shadows the CPU
#    onnxruntime (both install the same `onnxruntime` module). No new venv: when python3 is itself a virtual
#    environment's interpreter, a venv made from it with --system-site-packages would not see that
#    environment's torch. The project runs from this checkout (PYTHONPATH), nothing else is installed.
# 2. trains the fast recipe on cuda; exports to ONNX (+ int8), verified against PyTorch on cuda and cpu;
# 3. `fmnist-onnx bench` on cuda and cpu (fp32, IO binding, fp16 on cuda; fp32, int8 on cpu; PyTorch on both);
# 4. classify on 600,000 PNGs (the train split, ten times over: hard links) with --provider cuda and cpu, the
#    labels of both compared; `bench classify` with the worker scaling and the coordinator's CPU per file;
# 5. the fast training recipe on cuda, seeds 0,1,2 (TUTORIAL=1 adds the tutorial recipe, about a minute more).
# Fashion-MNIST: $FMNIST_DATA (the four .gz files) or Debian's folder. Everything printed goes to gpu.log too.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
SITE=${SITE:-/tmp/fmnist-gpu-site}
DURATION=${DURATION:-1}
COPIES=${COPIES:-10}
RUN=${RUN:-$(mktemp -d -t fmnist-gpu-XXXXXX)}  # models, PNG files, predictions: not results to commit
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu.log") 2>&1
start=$(date +%s)
step() { echo; echo "== $* ($(( $(date +%s) - start )) s)"; }

step "GPU"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || { echo "Error: no NVIDIA GPU or driver here"; exit 2; }
nproc

step "onnxruntime-gpu into $SITE"
PY=${PYTHON:-python3}
if [ -n "${WHEELS:-}" ]; then
  PIP=(--no-index --find-links "$WHEELS")
else
  PIP=()
fi
mkdir -p "$SITE"
# --no-deps: its dependencies (numpy, protobuf, ...) are the interpreter's own; the CUDA libraries come from
# torch's nvidia-* packages where the interpreter has them, else from onnxruntime-gpu's [cuda,cudnn] extra.
"$PY" -m pip install -q "${PIP[@]}" --no-deps --target "$SITE" onnxruntime-gpu \
  || { echo "Error: could not install onnxruntime-gpu (offline? set WHEELS to a folder with its wheel)"; exit 2; }
"$PY" -m pip install -q "${PIP[@]}" --no-deps --target "$SITE" pyspng 2>/dev/null \
  || echo "note: no pyspng: PNGs are decoded by Pillow alone (slower)"
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The CUDA/cuDNN libraries of the nvidia-* pip packages (torch's, or onnxruntime-gpu's), where onnxruntime's loader
# finds them.
NV_LIBS=$(SITE="$SITE" "$PY" -c 'import glob, os, site, sys
dirs = set(site.getsitepackages()) | {p for p in sys.path if p.endswith("-packages")} | {os.environ["SITE"]}
print(":".join(sorted({d for s in dirs for d in glob.glob(os.path.join(s, "nvidia", "*", "lib"))})))')
export LD_LIBRARY_PATH="${NV_LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
"$PY" -c 'import onnxruntime as o; print("onnxruntime", o.__version__, o.__file__, o.get_available_providers())'
"$PY" -c 'import onnxruntime as o, sys; sys.exit("Error: onnxruntime has no CUDA provider here" if "CUDAExecutionProvider" not in o.get_available_providers() else 0)'
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())' || echo "note: no torch: train/export/verify are skipped"
FM=("$PY" -m fmnist_onnx)

step "train (fast recipe) on cuda"
"${FM[@]}" train --device cuda --out-dir "$RUN" --restart --quiet

step "export to ONNX (verified against PyTorch on cuda and cpu), int8 beside it"
"${FM[@]}" export --weights "$RUN/model.pth" --output "$RUN/model.onnx" --quantize int8 \
  --provider cuda --provider cpu --json "$OUT/export.json"

step "verify on the CUDA execution provider"
"${FM[@]}" verify --weights "$RUN/model.pth" --model "$RUN/model.onnx" --provider cuda --json "$OUT/verify.json"

step "bench: cuda and cpu"
"${FM[@]}" bench --model "$RUN/model.onnx" --weights "$RUN/model.pth" --provider cuda --provider cpu \
  --duration "$DURATION" --json "$OUT/inference.json" --plot "$OUT/inference.png" --quiet

step "PNG files: the train split, $COPIES times over (hard links)"
"${FM[@]}" data export-png --split train --out "$RUN/png/0" --quiet
for i in $(seq 1 $((COPIES - 1))); do cp -al "$RUN/png/0" "$RUN/png/$i"; done
find "$RUN/png" -name '*.png' | wc -l
cat "$RUN"/png/0/*/*.png > /dev/null  # the page cache holds them (hard links: one copy)

for p in cuda cpu; do
  step "classify --provider $p on $(( COPIES * 60000 )) PNGs"
  "${FM[@]}" classify "$RUN/png" -m "$RUN/model.onnx" -o "$RUN/$p.csv" --provider "$p" --overwrite --json --quiet \
    > "$OUT/classify_$p.json" || [ $? -eq 3 ]
  "$PY" -c 'import json, sys; s = json.load(open(sys.argv[1])); print({k: s[k] for k in ("files", "failed", "seconds", "images_per_s", "provider", "workers", "decoder", "accuracy_pct")})' "$OUT/classify_$p.json"
done
"$PY" - "$RUN/cuda.csv" "$RUN/cpu.csv" <<'EOF'
import sys
from fmnist_onnx.sinks import read_rows
a, b = ({r["path"]: r["index"] for r in read_rows(p)} for p in sys.argv[1:3])
same = sum(a[k] == b.get(k) for k in a)
print(f"labels: {same} of {len(a)} the same on cuda and cpu ({len(a) - same} differ)")
EOF

step "bench classify: worker scaling, coordinator CPU per file (cuda, then cpu)"
for p in cuda cpu; do
  "${FM[@]}" bench classify "$RUN/png/0" -m "$RUN/model.onnx" --provider "$p" --scaling --json "$OUT/bench_classify_$p.json" --quiet
done

step "training recipes on cuda"
"$PY" benchmarks/train_recipes.py --device cuda --fast-seeds 0,1,2 --tutorial-seeds "${TUTORIAL:+0}" --out "$OUT/train.json"

step "done: $OUT (gpu.log, export.json, verify.json, inference.json, inference.png, classify_*.json, bench_classify_*.json, train.json)"
