#!/usr/bin/env bash
# The serving benchmark on a CUDA machine: resnet50 at 224 px (torchvision, seeded random weights, nothing
# downloaded) with one EnergyBased state, served by `python -m service` with max batch 64, measured with
# bench/serve.py at concurrency 1, 16, 64 and 256 against the in-process limit at batch 64 (the same model and
# detector called back to back on pre-decoded images), in float32 (channels_last, cuDNN autotuning: the defaults)
# and with OOD_AUTOCAST=float16; GPU memory and utilisation sampled with nvidia-smi during each run.
#
# It installs what it needs itself: it uses a Python whose torch sees CUDA ($PYTHON, else .venv/bin/python,
# else python3) and, when the service's other requirements are missing there, a virtual environment in
# build/gpu-venv that sees that Python's packages (--system-site-packages, so the machine's CUDA torch is kept)
# with pyproject's requirements except torch and torchvision (a matching torchvision is added with --no-deps
# when none is installed). Everything it writes goes to $OUT (default bench/results/gpu-<timestamp>/): the
# results JSON of each variant, the server logs' folder, gpu-<variant>.csv (nvidia-smi samples) and summary.md.
#
# Usage:   bench/gpu.sh                       # about 5 minutes on an H100-class GPU (limit: 8)
#          COMPILE=1 bench/gpu.sh             # also a torch.compile variant (adds 1-3 minutes)
# Env:     PYTHON, OUT, DURATION (6 s measured per cell, over ROUNDS=2 interleaved slices), CLIENT_PROCESSES
#          (load generators: one asyncio process tops out near 1000 requests/s; default nproc/4, 1..8),
#          VARIANTS ("fp32 fp16"), STEP_TIMEOUT_S (200: each variant's run is killed after this).
# Exit:    0 with summary.md written; 2 without a CUDA GPU or when the requirements cannot be installed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
STARTED=$(date +%s)
OUT="${OUT:-$ROOT/bench/results/gpu-$(date +%Y%m%dT%H%M%S)}"
DURATION="${DURATION:-6}"
ROUNDS="${ROUNDS:-2}"
VARIANTS="${VARIANTS:-fp32 fp16}"
STEP_TIMEOUT_S="${STEP_TIMEOUT_S:-200}"
if [[ "${COMPILE:-0}" == "1" ]]; then VARIANTS="$VARIANTS compile"; fi
mkdir -p "$OUT"
log() { echo "[gpu.sh $(($(date +%s) - STARTED))s] $*" >&2; }

# ------------------------------------------------------------------ a Python with CUDA torch
cuda_python() {
    "$1" - <<'EOF' 2>/dev/null
import torch
assert torch.cuda.is_available()
print(torch.__version__, torch.cuda.get_device_name(0))
EOF
}
PY=""
for candidate in "${PYTHON:-}" "$ROOT/.venv/bin/python" "$(command -v python3 || true)"; do
    if [[ -n "$candidate" && -x "$candidate" ]] && cuda_python "$candidate" >/dev/null; then PY="$candidate"; break; fi
done
if [[ -z "$PY" ]]; then
    echo "gpu.sh: no Python with a CUDA-enabled torch found (set PYTHON=...); nvidia-smi says:" >&2
    nvidia-smi -L >&2 || true
    exit 2
fi
log "python $PY: torch $(cuda_python "$PY")"

# ------------------------------------------------------------------ the service's other requirements
service_imports() { PYTHONPATH="$ROOT" "$1" -c "import service.app, torchvision, httpx, orjson, uvloop, httptools" 2>/dev/null; }
if ! service_imports "$PY"; then
    VENV="$ROOT/build/gpu-venv"
    log "installing the service's requirements into $VENV (torch kept from $PY)"
    [[ -x "$VENV/bin/python" ]] || "$PY" -m venv --system-site-packages "$VENV"
    REQUIREMENTS=$("$VENV/bin/python" - <<'EOF'
import tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print("\n".join(d for d in deps if not d.replace(" ", "").startswith(("torch=", "torch>", "torch<", "torchvision"))))
EOF
)
    # shellcheck disable=SC2086
    if ! "$VENV/bin/python" -m pip install -q $REQUIREMENTS; then
        echo "gpu.sh: cannot install the requirements (offline?): $REQUIREMENTS" >&2
        exit 2
    fi
    if ! "$VENV/bin/python" -c "import torchvision" 2>/dev/null; then  # torch 2.N pairs with torchvision 0.(N+15)
        MINOR=$("$VENV/bin/python" -c "import torch; print(int(torch.__version__.split('.')[1]) + 15)")
        "$VENV/bin/python" -m pip install -q --no-deps "torchvision==0.$MINOR.*" || { echo "gpu.sh: no torchvision" >&2; exit 2; }
    fi
    PY="$VENV/bin/python"
    service_imports "$PY" || { echo "gpu.sh: the service still does not import with $PY" >&2; exit 2; }
fi

# ------------------------------------------------------------------ resnet50 @ 224, seeded random weights
WORK="$OUT/model"
mkdir -p "$WORK"
PYTHONPATH="$ROOT" "$PY" - "$WORK" <<'EOF'
import json, sys
from pathlib import Path
import torch, torchvision
from safetensors.torch import save_file

work = Path(sys.argv[1])
torch.manual_seed(0)
network = torchvision.models.get_model("resnet50", weights=None, num_classes=1000).eval()
save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(work / "resnet50.safetensors"))
config = {
    "max_batch_size": 64,
    "models": [{
        "name": "resnet50",
        "architecture": "resnet50",
        "weights": str(work / "resnet50.safetensors"),
        "num_classes": 1000,
        "input_size": 224,
        "preprocessing": {"mode": "RGB"},
        "nodes": {"logits": "fc", "features": "flatten", "feature_maps": "layer4"},
        "heads": {"features": ["fc"]},
    }],
}
(work / "resnet50.json").write_text(json.dumps(config, indent=2))
EOF
log "model config $WORK/resnet50.json"

CPUS=$(nproc)
CLIENT_PROCESSES="${CLIENT_PROCESSES:-$(( CPUS / 4 < 1 ? 1 : (CPUS / 4 > 8 ? 8 : CPUS / 4) ))}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" || true

# ------------------------------------------------------------------ one run per variant
for variant in $VARIANTS; do
    case "$variant" in
        fp32) ENV=() ;;
        fp16) ENV=(OOD_AUTOCAST=float16) ;;
        compile) ENV=(OOD_AUTOCAST=float16 OOD_COMPILE=true) ;;
        *) echo "gpu.sh: unknown variant $variant" >&2; exit 2 ;;
    esac
    log "variant $variant (${ENV[*]:-defaults}), $CLIENT_PROCESSES load-generator processes"
    nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader,nounits -lms 500 \
        > "$OUT/gpu-$variant.csv" 2>/dev/null &
    SAMPLER=$!
    set +e
    env "${ENV[@]}" OOD_DEVICE=cuda PYTHONPATH="$ROOT" timeout "$STEP_TIMEOUT_S" "$PY" bench/serve.py \
        --scenarios config --config "$WORK/resnet50.json" --concurrency 1 16 64 256 --max-batch-size 64 \
        --modes batched inprocess --inprocess-predecoded --client-processes "$CLIENT_PROCESSES" \
        --duration "$DURATION" --rounds "$ROUNDS" --warmup 2 --out "$OUT/serve-$variant.json" \
        > "$OUT/serve-$variant.txt" 2>&1
    STATUS=$?
    set -e
    kill "$SAMPLER" 2>/dev/null || true
    wait "$SAMPLER" 2>/dev/null || true
    if [[ $STATUS -ne 0 ]]; then
        log "variant $variant failed (status $STATUS); the end of its output:"
        tail -20 "$OUT/serve-$variant.txt" >&2
    fi
done

# ------------------------------------------------------------------ summary
"$PY" - "$OUT" $VARIANTS > "$OUT/summary.md" <<'EOF'
import json, sys
from pathlib import Path

out, variants = Path(sys.argv[1]), sys.argv[2:]
gpu = (out / "gpu.txt").read_text().strip() if (out / "gpu.txt").exists() else "?"
print(f"GPU: {gpu}\n")
print("| variant | concurrency | images/s | p50 ms | p99 ms | mean batch | / in-process @ 64 | GPU MiB (peak) | GPU util % (peak) |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for variant in variants:
    path = out / f"serve-{variant}.json"
    if not path.exists():
        print(f"| {variant} | failed: see serve-{variant}.txt | | | | | | | |")
        continue
    cells = json.loads(path.read_text())["cells"]
    limit = next((c["images_per_s"] for c in cells if c["mode"] == "inprocess" and c["concurrency"] == 64), None)
    samples = [line.split(",") for line in (out / f"gpu-{variant}.csv").read_text().splitlines() if "," in line]
    memory = max((float(m) for m, _ in samples), default=float("nan"))
    util = max((float(u) for _, u in samples), default=float("nan"))
    print(f"| {variant} | in-process, batch 64 | {limit or float('nan'):.1f} | | | 64 | 1.00x | {memory:.0f} | {util:.0f} |")
    for c in cells:
        if c["mode"] != "batched":
            continue
        ratio = f"{c['images_per_s'] / limit:.2f}x" if limit else ""
        print(
            f"| {variant} | {c['concurrency']} | {c['images_per_s']:.1f} | {c['p50_ms']:.1f} | {c['p99_ms']:.1f} "
            f"| {c['mean_batch_size'] or 0:.1f} | {ratio} | {memory:.0f} | {util:.0f} |"
        )
EOF
cat "$OUT/summary.md"
log "done: $OUT/summary.md"
