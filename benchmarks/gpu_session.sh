#!/usr/bin/env bash
# The GPU checks of issues 13 and 14, as one prepared run on a lent GPU machine (the device
# tool: a bare image with CUDA PyTorch, no registry). Carry the wheels fedpriv needs there
# (.whl, cp312; see BENCHMARKS.md "On a GPU") and run from the repository's root. The wheels
# (about 24 MB; the image has torch, numpy, scipy, scikit-learn, grpcio, rich, click):
#
#     pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
#         --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
#         --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
#         flwr==1.41.0 opacus==1.6.0 tenseal==0.3.18 dp-accounting==0.6.0 dm-tree==0.1.10 \
#         cryptography==50.0.2 cffi==2.1.1 pycparser==3.12 pycryptodome==3.24.1 \
#         iterators==0.0.2 tomli==2.5.0 tomli_w==1.2.0 grpcio-health-checking==1.81.1 \
#         prompt_toolkit==3.0.53 wcwidth==0.9.4 SQLAlchemy==2.1.9 greenlet==3.5.6 \
#         alembic==1.20.1 Mako==1.4.3 typer==0.20.1 fastapi==0.138.2 starlette==1.3.1 \
#         pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
#         typing-inspection==0.4.5 uvicorn==0.49.0 annotated-doc==0.0.7 protobuf==6.33.6
#
#
#     bash benchmarks/gpu_session.sh            # writes into $OUT (default /tmp/gpu-out)
#
# 1. smoke: versions, imports, and a 2-round DP simulation on CUDA through the forked workers
#    (which GPU each worker saw: nvidia-smi's compute processes during the runs);
# 2. the DP step cost on CUDA (benchmarks/dp_overhead.py), 28x28 CNN at widths 16 and 64;
# share. the default GPU share with --device auto (24 hospitals on the machine's cores), and
#    secure aggregation's one-exchange rounds on CUDA (STAGES="smoke share": not by default);
# 3. the 28x28 privacy-utility table (organs28, the DP recipe, epsilon 1/2/4/8 and no DP,
#    3 seeds) with the default CNN (width 16) and a larger one (width 64), six sweeps at once;
#    width 64 asks for --gpus-per-hospital 0.2, width 16 gets --device cuda's own share.
# Each stage has its own time limit, so a slow stage leaves the others their time; what each
# wrote is in $OUT as soon as it ends.
set -u
OUT=${OUT:-/tmp/gpu-out}
DEVICE=${DEVICE:-cuda}          # cpu: a dry run of this script on a machine without a GPU
WIDTHS=${WIDTHS:-16 64}
SEEDS=${SEEDS:-0 1 2}
EPSILONS=${EPSILONS:-4 8 2 1}
EXTRA_SET=${EXTRA_SET:-}        # more simulate settings for every sweep (key=value ...)
STAGES=${STAGES:-smoke dp table}
PY=${PY:-python3}               # the device machine's python3 holds its CUDA PyTorch
mkdir -p "$OUT"
START=$(date +%s)
LOG="$OUT/session.log"
say() { echo "[$(($(date +%s) - START)) s] $*" | tee -a "$LOG"; }

if [ -d .whl ] && [ -z "${NO_WHEELS:-}" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl >>"$LOG" 2>&1 || { say "wheels did not install"; exit 3; }
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
say "wheels installed"

{
    nvidia-smi || true
    "$PY" - <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "torch", torch.__version__,
      "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for name in ("flwr", "opacus", "tenseal", "dp_accounting", "numpy", "sklearn", "cryptography", "typer"):
    module = importlib.import_module(name)
    print(name, getattr(module, "__version__", "?"))
import fedpriv.cli, fedpriv.server.simulation  # noqa: F401
print("fedpriv imports")
EOF
} >"$OUT/smoke.txt" 2>&1 || { say "smoke imports failed"; tail -20 "$OUT/smoke.txt"; exit 4; }
say "imports ok"

# what runs on the GPU, every 5 s, while the simulations run
( while true; do
    echo "--- $(($(date +%s) - START)) s"
    nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader 2>&1
    sleep 5
  done ) >"$OUT/gpu_apps.txt" 2>&1 &
WATCH=$!

timeout 90 "$PY" -m fedpriv.cli simulate --dataset digits --hospitals 3 --rounds 2 \
    --device "$DEVICE" --epsilon 4 --out /tmp/smoke --name smoke >>"$OUT/smoke.txt" 2>&1
say "smoke simulation exit $?"
{
    echo "--- workers.log"; tail -5 /tmp/smoke/smoke/workers.log 2>&1
    echo "--- metrics"; tail -c 600 /tmp/smoke/smoke/metrics.jsonl 2>&1
    echo "--- flower.log"; tail -12 /tmp/smoke/smoke/flower.log 2>&1
} >>"$OUT/smoke.txt"

if [[ " $STAGES " == *" share "* ]]; then
# the default GPU share (--device auto, no --gpus-per-hospital): one hospital a core, at most
# one a GiB of GPU memory; then secure aggregation's one-exchange rounds on the GPU
timeout 150 "$PY" -m fedpriv.cli simulate --dataset digits --hospitals 24 --rounds 2 \
    --device auto --epsilon 4 --out /tmp/share --name auto >"$OUT/share_auto.txt" 2>&1
say "share: --device auto, 24 hospitals: exit $?"
timeout 120 "$PY" -m fedpriv.cli simulate --dataset digits --hospitals 5 --rounds 4 \
    --device cuda --epsilon 4 --aggregation secagg --out /tmp/share --name secagg \
    >"$OUT/share_secagg.txt" 2>&1
say "share: secagg on cuda: exit $?"
for run in auto secagg; do
    echo "--- $run config"; "$PY" -c "import json; c = json.load(open('/tmp/share/$run/config.json')); print({k: c.get(k) for k in ('device', 'gpus-per-hospital', 'cpus-per-hospital')})"
    echo "--- $run workers.log"; tail -4 "/tmp/share/$run/workers.log"
    echo "--- $run metrics"; "$PY" -c "
import json
for line in open('/tmp/share/$run/metrics.jsonl'):
    r = json.loads(line); a = r.get('aggregation', {})
    print(r['round'], r.get('eval_accuracy'), a.get('exchanges'), r.get('aggregate_failure', ''))"
done >"$OUT/share_runs.txt" 2>&1
fi

if [[ " $STAGES " == *" dp "* ]]; then
timeout 100 "$PY" benchmarks/dp_overhead.py --device "$DEVICE" --models cnn --no-default-shapes \
    --shape 1,28,28 --batches 256 1024 --modes none hooks ghost --steps 100 --warmup 10 \
    --width 16 --json /tmp/dp16.json >>"$LOG" 2>&1
say "dp step cost, width 16: exit $?"
timeout 100 "$PY" benchmarks/dp_overhead.py --device "$DEVICE" --models cnn --no-default-shapes \
    --shape 1,28,28 --batches 256 1024 --modes none hooks ghost --steps 100 --warmup 10 \
    --width 64 --json /tmp/dp64.json >>"$LOG" 2>&1
say "dp step cost, width 64: exit $?"
"$PY" -c "
import json, sys
rows = [json.load(open(f)) for f in sys.argv[1:] if __import__('os').path.exists(f)]
json.dump(rows, open('$OUT/dp_step_cuda.json', 'w'), indent=1)
" /tmp/dp16.json /tmp/dp64.json
fi
[[ " $STAGES " == *" table "* ]] || { kill "$WATCH" 2>/dev/null; exit 0; }

"$PY" benchmarks/public_sets.py --out /tmp/fedpriv-public >>"$LOG" 2>&1
LEFT=$((${DEADLINE_S:-520} - ($(date +%s) - START)))
say "privacy-utility sweeps start, $LEFT s left"
pids=()
for width in $WIDTHS; do
    share=""
    [ "$width" = 64 ] && [ "$DEVICE" = cuda ] && share="gpus-per-hospital=0.2"
    for seed in $SEEDS; do
        timeout "$LEFT" "$PY" benchmarks/privacy_utility.py --arms after --datasets organs28 \
            --epsilons $EPSILONS --baseline-first --seeds "$seed" --public-dir /tmp/fedpriv-public \
            --out "/tmp/pu-$width-$seed" --results "/tmp/pu-$width-$seed.jsonl" \
            --set device=$DEVICE model-width=$width $share $EXTRA_SET \
            >>"/tmp/pu-$width-$seed.log" 2>&1 &
        pids+=($!)
    done
done
for pid in "${pids[@]}"; do wait "$pid"; done
cat /tmp/pu-*.jsonl >"$OUT/privacy_utility_gpu.jsonl" 2>/dev/null
tail -n 3 /tmp/pu-*.log >>"$LOG" 2>&1
for run in /tmp/pu-*/*/; do  # a run that did not finish: what Flower and the workers said
    [ -f "$run/report.html" ] || { echo "--- $run"; tail -6 "$run/flower.log" "$run/workers.log"; }
done 2>&1 | tail -60 >>"$LOG"
say "sweeps done: $(wc -l <"$OUT/privacy_utility_gpu.jsonl") runs"
kill "$WATCH" 2>/dev/null
