#!/usr/bin/env bash
# One ~9-minute call on one H200 (the device tool's nvidia-h200): the layer benchmark alone on the
# GPU, then, sharing the GPU, the GPU tests of the memory and the quality studies of
# docs/quality.md cut to fit (MQAR under Zoology's protocol at width 128, passkey, long documents),
# each stopped by a time budget. Results: $OUT/bench_layer.log, $OUT/gpu_tests.log and
# $OUT/runs.tgz (every run's JSON and log; no weights).
#
#   OUT=/tmp/h200 bash scripts/h200_session.sh        # budgets in seconds below
set -u
OUT=${OUT:-runs/h200-out}
RUNS=runs/h200
STUDY_BUDGET=${STUDY_BUDGET:-330}   # wall seconds for the studies, after the benchmark
mkdir -p "$OUT" "$RUNS"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
MMREC="python3 -m mm_rec"
{ nvidia-smi; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; date -u; } > "$OUT/env.txt" 2>&1

# 1. the layer benchmark, alone on the GPU
timeout 150 python3 benchmarks/bench_layer.py --preset 7b --shapes 4x2048,1x32768 --iters 6 --warmup 2 \
    --compile > "$OUT/bench_layer.log" 2>&1

# 2. sharing the GPU: tests and studies
timeout 200 python3 -m pytest -q -m gpu tests/core/test_memory_gpu.py tests/test_model_gpu.py -rf \
    -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1 &

python3 scripts/quality_studies.py mqar-zoology --dry-run --out "$RUNS" > "$RUNS/mqar_commands.txt" 2>&1
SETS="--train-sets 64:4:100000,128:8:20000,256:16:20000,256:32:20000,256:64:20000 --test-sets 512:64,256:64,128:8"
R=$RUNS/mqar-zoology/recipes
zoology() {  # name recipe lr
    mkdir -p "$RUNS/mqar/$1"
    timeout -s INT $((STUDY_BUDGET + 20)) $MMREC eval --task mqar --protocol zoology --train --config "$R/$2.yaml" \
        --lr "$3" --vocab 8192 --seed 0 --time-budget $((STUDY_BUDGET - 60)) $SETS --out "$RUNS/mqar/$1" \
        > "$RUNS/mqar/$1/log.txt" 2>&1 &
}
zoology transformer_lr2.2e-3 transformer_w128 0.0022
zoology transformer_lr4.6e-4 transformer_w128 0.00046
zoology mmrec_lr2.2e-3 mmrec_w128 0.0022
zoology mmrec_lr4.6e-4 mmrec_w128 0.00046
for ablation in no_window level2_mean state_input slot_mean retention_age; do
    zoology "mmrec_${ablation}_lr2.2e-3" "mmrec_w128_${ablation}" 0.0022
done

passkey() {  # name recipe
    mkdir -p "$RUNS/passkey/$1"
    timeout -s INT $((STUDY_BUDGET + 20)) $MMREC eval --task passkey --train --config "$2" --seed 0 \
        --time-budget $((STUDY_BUDGET - 130)) --lengths 2k,8k,32k,128k --samples 3 --out "$RUNS/passkey/$1" \
        > "$RUNS/passkey/$1/log.txt" 2>&1 &
}
passkey mmrec configs/passkey_mmrec.yaml
passkey transformer configs/passkey_transformer.yaml

longdoc() {  # name recipe [overrides]: train (SIGINT saves a checkpoint), then score
    local name=$1 recipe=$2; shift 2
    mkdir -p "$RUNS/longdoc"
    ( timeout -s INT $((STUDY_BUDGET - 90)) $MMREC train --config "$recipe" --seed 0 --out "$RUNS/longdoc/$name" "$@" \
          > "$RUNS/longdoc/$name.train.log" 2>&1
      timeout 80 $MMREC eval --task longdoc --checkpoint "$RUNS/longdoc/$name" --out "$RUNS/longdoc/${name}_eval" \
          > "$RUNS/longdoc/$name.eval.log" 2>&1 ) &
}
longdoc mmrec configs/longdoc_mmrec.yaml
longdoc mmrec_no_memory configs/longdoc_mmrec.yaml --set model.memory_size_M=0
longdoc transformer configs/longdoc_transformer.yaml

wait
tar czf "$OUT/runs.tgz" --exclude='*.safetensors' --exclude='*.pt' --exclude='*.distcp' --exclude=tensorboard \
    --exclude=data "$RUNS"
ls -la "$OUT"
