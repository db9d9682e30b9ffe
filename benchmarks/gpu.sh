#!/usr/bin/env bash
# The CUDA benchmarks, in one short run (under 5 minutes) on a machine with an NVIDIA GPU:
#
#   bash benchmarks/gpu.sh                 # from the repository root; results in benchmarks/results/gpu/
#
# 1. a venv (.venv-gpu) that sees the system's packages (torch) but holds onnxruntime-gpu instead of the CPU
#    onnxruntime: both install the same `onnxruntime` module, and with both in one place CUDA is lost;
# 2. trains the fast recipe on cuda; exports to ONNX (+ int8); verifies it against PyTorch on the CUDA provider;
# 3. `fmnist-onnx bench` on cuda and cpu (fp32, IO binding, fp16 on cuda; fp32, int8 on cpu; PyTorch on both);
# 4. the fast training recipe on cuda, seeds 0,1,2 (TUTORIAL=1 adds the tutorial recipe, about a minute more).
# Everything it prints also goes to benchmarks/results/gpu/gpu.log: record it in the README.
# Without network, point pip at wheels fetched elsewhere: PIP_FIND_LINKS=/path/to/wheels bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
VENV=${VENV:-.venv-gpu}
DURATION=${DURATION:-1}
RUN=${RUN:-$(mktemp -d -t fmnist-gpu-XXXXXX)}  # model.pth, model.onnx, model.int8.onnx: not results to commit
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu.log") 2>&1
start=$(date +%s)
step() { echo; echo "== $* ($(( $(date +%s) - start )) s)"; }

step "GPU"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || { echo "Error: no NVIDIA GPU or driver here"; exit 2; }

step "venv $VENV with onnxruntime-gpu"
python3 -m venv --system-site-packages "$VENV"
PY="$VENV/bin/python"
# [cuda,cudnn] brings the CUDA and cuDNN libraries onnxruntime-gpu was built against, as pip packages.
"$PY" -m pip install -q "onnxruntime-gpu[cuda,cudnn]" || "$PY" -m pip install -q onnxruntime-gpu || {
  echo "Error: could not install onnxruntime-gpu (no network? set PIP_FIND_LINKS to a folder of wheels)"; exit 2; }
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1
# --no-deps: the project's dependencies name the CPU onnxruntime, which must not land in this venv.
"$PY" -m pip install -q --no-deps -e .
"$PY" -m pip install -q click numpy pillow tqdm onnx onnxscript matplotlib
# The CUDA/cuDNN libraries of those pip packages, where onnxruntime's loader finds them.
NV_LIBS=$("$PY" -c 'import glob, os, site
print(":".join(sorted({d for s in site.getsitepackages() for d in glob.glob(os.path.join(s, "nvidia", "*", "lib"))})))')
export LD_LIBRARY_PATH="${NV_LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
"$PY" -c 'import onnxruntime as o, torch; print("onnxruntime", o.__version__, o.get_device(), o.get_available_providers()); print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
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

step "training recipes on cuda"
"$PY" benchmarks/train_recipes.py --device cuda --fast-seeds 0,1,2 --tutorial-seeds "${TUTORIAL:+0}" --out "$OUT/train.json"

step "done: $OUT (gpu.log, export.json, verify.json, inference.json, inference.png, train.json)"
