#!/usr/bin/env bash
# The GPU checks in one call, each part under its own time limit so that the whole stays under
# ten minutes (for a GPU machine reached by one command of limited length). Parts, in order of
# value:
#
#   1. tests   the pytest tests marked gpu (CUDA numerics, graphs, the re-run of the
#              graph-capture warning fix)                                  <= 150 s
#   2. check   -m glasslstm.bench.gpu_check: the Triton cell and LSTM against cuDNN and bptt,
#              graphs, bf16 autocast, speed against cuDNN                  <= 150 s
#   3. lm      the tiny-shakespeare run of the language-modelling issue (2 x 1024, dropout
#              0.5, weight decay 0.1, batch 64) for --time-budget seconds  <= budget + 60 s
#
# Every part writes its log (and JSON) under $OUT (default: ./gpu-out); a part that fails or
# runs out of time is recorded in summary.txt and the next one still runs.
#
# From the repository root, torch + triton installed, the package not:
#     bash src/glasslstm/bench/gpu_session.sh                 # on the GPU machine
#     GPU_SESSION_SMOKE=1 bash src/glasslstm/bench/gpu_session.sh   # on a CPU: tiny sizes, ~1 minute
# The shakespeare text is looked up as the trainer does ($GLASSLSTM_DATA, --data-dir, the
# cache): copy ../shared/data/tinyshakespeare to data/tinyshakespeare and carry "data".
set -u
cd "$(dirname "$0")/../../.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
export GLASSLSTM_DATA=${GLASSLSTM_DATA:-data}
PY=${PYTHON:-python3}
BUDGET=${LM_BUDGET:-270}
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

part() {  # part NAME LIMIT_S COMMAND...: run with a time limit, log, record the outcome
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout --signal=INT --kill-after=20 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local how="ok"
    [ $rc -ne 0 ] && how="exit $rc"
    [ $rc -eq 124 ] && how="timed out after ${limit}s"
    echo "$name: $how ($((SECONDS - start)) s)" | tee -a "$SUMMARY"
    tail -n 5 "$OUT/$name.log" | sed 's/^/    /' >> "$SUMMARY"
}

if [ -n "${GPU_SESSION_SMOKE:-}" ]; then    # a CPU rehearsal of the same three parts
    export TRITON_INTERPRET=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    part tests 150 "$PY" -m pytest -q -x tests/test_triton.py -k "autocast or graphed"
    part check 150 "$PY" -m glasslstm.bench.gpu_check --device cpu --quick --json "$OUT/gpu_check.json"
    part lm 120 "$PY" -m glasslstm train --data shakespeare --layers 1 --hidden 32 \
        --max-steps 20 --eval-every 10 --eval-batches 2 --batch-size 8 --seq-len 32 \
        --device cpu --out "$OUT/lm-run" --json
else
    "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 2
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>&1
    part tests 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider
    part check 150 "$PY" -m glasslstm.bench.gpu_check --budget-s 100 --json "$OUT/gpu_check.json"
    part lm $((BUDGET + 60)) "$PY" -m glasslstm train --data shakespeare --layers 2 \
        --hidden 1024 --dropout 0.5 --weight-decay 0.1 --batch-size 64 --time-budget "$BUDGET" \
        --eval-every 150 --min-lr-ratio 0.05 --warmup 150 --out "$OUT/lm-run" --json
fi
# keep what comes back small: the run's metrics, not its checkpoints
[ -d "$OUT/lm-run" ] && cp "$OUT/lm-run/metrics.jsonl" "$OUT/lm-metrics.jsonl" 2>/dev/null
rm -rf "$OUT/lm-run"
cat "$SUMMARY"
