#!/usr/bin/env bash
# The CUDA benchmarks, in one short run (under 5 minutes on an H100) on a machine with an NVIDIA GPU:
#
#   bash benchmarks/gpu.sh                         # from the repository root; results in benchmarks/results/gpu/
#   WHEELS=/tmp/whl bash benchmarks/gpu.sh         # offline: onnxruntime-gpu (and pyspng) from a folder of wheels
#   GPU=cpu COPIES=1 bash benchmarks/gpu.sh        # every step on the CPU: a check of this script, on any machine
#
# 1. onnxruntime-gpu goes into a folder of its own ($SITE) put first on PYTHONPATH, where it shadows the CPU
#    onnxruntime (both install the same `onnxruntime` module). No new venv: when python3 is itself a virtual
#    environment's interpreter, a venv made from it with --system-site-packages would not see that
#    environment's torch. The project runs from this checkout (PYTHONPATH), nothing else is installed.
# 2. trains the fast recipe on cuda; exports to ONNX (+ int8), verified against PyTorch on cuda and cpu;
# 3. `fmnist-onnx bench` on cuda and cpu (fp32, IO binding, fp16 on cuda; fp32, int8 on cpu; PyTorch on both);
# 4. classify on 600,000 PNGs (the train split, ten times over: hard links) with --provider cuda and cpu, the
#    labels of both compared; where the time goes (CUDA's start, decoding alone, 1, 2 or 4 inference
#    processes); `bench classify` with the worker scaling and the coordinator's CPU per file;
# 5. the fast training recipe on cuda, seeds 0,1,2 (TUTORIAL=1 adds the tutorial recipe, about a minute more).
# Fashion-MNIST: $FMNIST_DATA (the four .gz files) or Debian's folder. Everything printed goes to gpu.log too.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
SITE=${SITE:-/tmp/fmnist-gpu-site}
DURATION=${DURATION:-1}
COPIES=${COPIES:-10}
GPU=${GPU:-cuda}  # the provider (and torch device) under test; cpu: no GPU, no onnxruntime-gpu, same steps
RUN=${RUN:-$(mktemp -d -t fmnist-gpu-XXXXXX)}  # models, PNG files, predictions: not results to commit
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu.log") 2>&1
start=$(date +%s)
step() { echo; echo "== $* ($(( $(date +%s) - start )) s)"; }

step "machine"
if [ "$GPU" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || { echo "Error: no NVIDIA GPU or driver here"; exit 2; }
fi
nproc
lscpu | grep -E '^(Model name|Thread\(s\) per core|Core\(s\) per socket|Socket\(s\)):' || true

PY=${PYTHON:-python3}
install_onnxruntime_gpu() {
  local pip=()
  [ -n "${WHEELS:-}" ] && pip=(--no-index --find-links "$WHEELS")
  mkdir -p "$SITE"
  # --no-deps: its dependencies (numpy, protobuf, ...) are the interpreter's own; the CUDA libraries come from
  # torch's nvidia-* packages where the interpreter has them, else from onnxruntime-gpu's [cuda,cudnn] extra.
  "$PY" -m pip install -q "${pip[@]}" --no-deps --target "$SITE" onnxruntime-gpu \
    || { echo "Error: could not install onnxruntime-gpu (offline? set WHEELS to a folder with its wheel)"; exit 2; }
  "$PY" -m pip install -q "${pip[@]}" --no-deps --target "$SITE" pyspng 2>/dev/null \
    || echo "note: no pyspng: PNGs are decoded by Pillow alone (slower)"
  export PYTHONPATH="$SITE:$PYTHONPATH"
  # The CUDA/cuDNN libraries of the nvidia-* pip packages (torch's, or onnxruntime-gpu's), where onnxruntime's
  # loader finds them.
  local libs
  libs=$(SITE="$SITE" "$PY" -c 'import glob, os, site, sys
dirs = set(site.getsitepackages()) | {p for p in sys.path if p.endswith("-packages")} | {os.environ["SITE"]}
print(":".join(sorted({d for s in dirs for d in glob.glob(os.path.join(s, "nvidia", "*", "lib"))})))')
  export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "$GPU" = cuda ]; then
  step "onnxruntime-gpu into $SITE"
  install_onnxruntime_gpu
fi
"$PY" -c 'import onnxruntime as o; print("onnxruntime", o.__version__, o.__file__, o.get_available_providers())'
"$PY" -c 'import onnxruntime as o, sys; from fmnist_onnx.runtime import PROVIDERS as P; p = P[sys.argv[1]]
sys.exit(f"Error: onnxruntime has no {p} here" if p not in o.get_available_providers() else 0)' "$GPU"
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())' || echo "note: no torch: train/export/verify are skipped"
"$PY" -c 'import fmnist_onnx.images as i; print("decoder:", "libspng + Pillow" if i.pyspng else "Pillow alone")'
FM=("$PY" -m fmnist_onnx)

step "train (fast recipe) on $GPU"
"${FM[@]}" train --device "$GPU" --out-dir "$RUN" --overwrite --quiet

step "export to ONNX (verified against PyTorch on $GPU and cpu), int8 beside it"
"${FM[@]}" export --weights "$RUN/model.pth" --output "$RUN/model.onnx" --quantize int8 \
  --provider "$GPU" --provider cpu --json "$OUT/export.json" --overwrite

step "verify on $GPU"
"${FM[@]}" verify --weights "$RUN/model.pth" --model "$RUN/model.onnx" --provider "$GPU" --json "$OUT/verify.json" --overwrite

step "bench: $GPU and cpu"
"${FM[@]}" bench --model "$RUN/model.onnx" --weights "$RUN/model.pth" --provider "$GPU" --provider cpu \
  --duration "$DURATION" --json "$OUT/inference.json" --plot "$OUT/inference.png" --overwrite --quiet

step "PNG files: the train split, $COPIES times over (hard links)"
"${FM[@]}" data export-png --split train --out "$RUN/png/0" --quiet
for i in $(seq 1 $((COPIES - 1))); do cp -al "$RUN/png/0" "$RUN/png/$i"; done
find "$RUN/png" -name '*.png' | wc -l
find "$RUN/png/0" -name "*.png" -exec cat {} + > /dev/null  # the page cache holds them (hard links: one copy)

for p in "$GPU" cpu; do
  step "classify --provider $p on $(( COPIES * 60000 )) PNGs"
  "${FM[@]}" classify "$RUN/png" -m "$RUN/model.onnx" -o "$RUN/$p.csv" --provider "$p" --overwrite --json --quiet \
    > "$OUT/classify_$p.json" || [ $? -eq 3 ]
  "$PY" -c 'import json, sys; s = json.load(open(sys.argv[1])); print({k: s[k] for k in ("files", "failed", "seconds", "images_per_s", "provider", "workers", "decoder", "accuracy_pct")})' "$OUT/classify_$p.json"
done
"$PY" - "$RUN/$GPU.csv" "$RUN/cpu.csv" "$GPU" <<'EOF'
import sys
from fmnist_onnx.table import read_rows
a, b = ({r["path"]: r["index"] for r in read_rows(p)} for p in sys.argv[1:3])
same = sum(a[k] == b.get(k) for k in a)
print(f"labels: {same} of {len(a)} the same on {sys.argv[3]} and cpu ({len(a) - same} differ)")
EOF

step "where the time goes: session start, decoding alone, inference processes ($GPU), on $(( COPIES * 60000 )) PNGs"
# The session's start in a process of its own (CUDA must not start in the process that forks the workers)
"$PY" -c 'import sys, time; t = time.perf_counter(); from fmnist_onnx.runtime import open_session
s = open_session(sys.argv[1], sys.argv[2], threads=1); print(f"{sys.argv[2]} session start (import + session): {time.perf_counter() - t:.2f} s")' "$RUN/model.onnx" "$GPU"
"$PY" - "$RUN/png" "$RUN/model.onnx" "$OUT/classify_variants.json" "$RUN/variant.csv" "$GPU" <<'EOF'
# Each variant twice (the best counts), with the CPU time of this process (it walks and writes) and of its
# children (workers, inference processes): a process at about 1 CPU-s per second of wall time is the limit.
import json, resource, sys, time
from pathlib import Path
import fmnist_onnx.classify as cl
from fmnist_onnx.classify import contract  # the chunk caps, read by the engine at each run
from fmnist_onnx.bench_pipeline import _decode_chunks, images_under
from fmnist_onnx.classify.engines.local import default_workers
folder, model, out, csv, gpu = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
paths = list(images_under(folder))
w = default_workers()
res = []
t = time.perf_counter(); _decode_chunks(paths, w, 2048); dt = time.perf_counter() - t
res.append({"what": f"decode alone ({w} processes)", "images": len(paths), "seconds": round(dt, 3),
            "images_per_s": round(len(paths) / dt)})
print(res[-1], flush=True)
def cpu(who):
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime
defaults = {"MAX_CHUNK": contract.MAX_CHUNK, "BATCHED_MAX_CHUNK": contract.BATCHED_MAX_CHUNK}
for provider, workers, stages, max_chunk, switch in (
        (gpu, w, 2, None, None), ("cpu", w, None, None, None), (gpu, w, 1, None, None), (gpu, w, 4, None, None),
        (gpu, max(1, w - 2), 2, None, None), (gpu, w, 2, 2048, None), ("cpu", w, None, 8192, None),
        (gpu, w, 2, None, 0.0005), ("cpu", w, None, None, 0.0005)):
    # the cap of the path under test (read by the chunk sizing and the slots at each run); the other's default
    for name, value in defaults.items():
        setattr(contract, name, value)
    if max_chunk:
        setattr(contract, "BATCHED_MAX_CHUNK" if stages else "MAX_CHUNK", max_chunk)
    old_switch = sys.getswitchinterval()
    sys.setswitchinterval(switch or old_switch)
    best = None
    for _ in range(2):
        c0, k0 = cpu(resource.RUSAGE_SELF), cpu(resource.RUSAGE_CHILDREN)
        s = cl.classify([folder], model, csv, overwrite=True, provider=provider, workers=workers, stages=stages,
                        inference="batched" if stages else "auto")
        c1, k1 = cpu(resource.RUSAGE_SELF), cpu(resource.RUSAGE_CHILDREN)
        if best is None or s.seconds < best[0].seconds:
            best = (s, c1 - c0, k1 - k0)
    sys.setswitchinterval(old_switch)
    s, parent, children = best
    what = f"classify --provider {provider}, {workers} workers" + (f", {stages} inference processes" if stages else "")
    what += (f", chunks up to {max_chunk}" if max_chunk else "") + (f", switch interval {switch * 1e3} ms" if switch else "")
    res.append({"what": what, "images": s.files, "seconds": s.seconds, "images_per_s": s.images_per_s,
                "parent_cpu_s": round(parent, 2), "children_cpu_s": round(children, 2)})
    print(res[-1], flush=True)
for name, value in defaults.items():
    setattr(cl, name, value)
Path(out).write_text(json.dumps(res, indent=1))
EOF

step "bench classify: worker scaling, coordinator CPU per file ($GPU, then cpu)"
for p in "$GPU" cpu; do
  "${FM[@]}" bench classify "$RUN/png/0" -m "$RUN/model.onnx" --provider "$p" --scaling --json "$OUT/bench_classify_$p.json" --overwrite --quiet
done

step "training recipes on $GPU"
"$PY" benchmarks/train_recipes.py --device "$GPU" --fast-seeds 0,1,2 --tutorial-seeds "${TUTORIAL:+0}" --out "$OUT/train.json"

step "done: $OUT (gpu.log, export.json, verify.json, inference.json, inference.png, classify_*.json, bench_classify_*.json, train.json)"
