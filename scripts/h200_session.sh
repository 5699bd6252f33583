#!/usr/bin/env bash
# GPU sessions on one H200 (the device tool's nvidia-h200), each one call of under 10 minutes.
# Every number in docs/quality.md and docs/benchmarks.md marked with a phase below came from it.
#
#   OUT=/tmp/h200 bash scripts/h200_session.sh recall   # sharing the GPU: GPU tests, MQAR (Zoology),
#                                                       # passkey, the language-model pairs (WITH_LM= : without)
#   OUT=/tmp/h200 bash scripts/h200_session.sh lm       # layer benchmark alone, then long documents
#                                                       # (and the language-model pairs with WITH_LM=1: copy
#                                                       # the two texts to runs/data and carry it; LM_VARIANT=
#                                                       # model.decay_init=0.9 adds MM-Rec with that override)
#   OUT=/tmp/h200 LR=0.001 bash scripts/h200_session.sh ablations   # MQAR (Zoology) with memory pieces off
#   OUT=/tmp/h200 PASSKEY_ABLATIONS="retention=age level2=mean" bash scripts/h200_session.sh passkey
#                                                       # (PASSKEY_PATHS=1: then scripts/passkey_paths.py at 32K/128K)
#   OUT=/tmp/h200 bash scripts/h200_session.sh widths     # MQAR (Zoology) at widths 64 and 256
#   OUT=/tmp/h200 bash scripts/h200_session.sh cuda       # alone: build + test the CUDA scan and recurrence,
#                                                       # bench_scan, bench_recurrence (CUDA_OPS=recurrence:
#                                                       # the recurrence's steps only)
#   OUT=/tmp/h200 bash scripts/h200_session.sh decode     # alone: JAX scan bench, decode GPU tests, MM-Rec's
#                                                       # bench_generate (bf16/int8/int4; carry torchao's wheel
#                                                       # in .whl, device README: pip install --target, PYTHONPATH)
#   OUT=/tmp/h200 bash scripts/h200_session.sh studies    # sharing the GPU: passkey ablations at 8K/32K, MM-Rec's
#                                                       # Shakespeare recipe (carry runs/data), the Transformer's
#                                                       # MQAR at width 64 and lr 1e-2
#   OUT=/tmp/h200 bash scripts/h200_session.sh recall2    # the passkey recipe (beside MM-Rec's LM recipes unless WITH_LM= ), then passkey_paths
#   OUT=/tmp/h200 bash scripts/h200_session.sh decode_hf  # alone: the Hugging Face Llama beside MM-Rec
#   OUT=/tmp/h200 bash scripts/h200_session.sh priority   # alone, when one call is all there is:
#                                                       # CUDA build + GPU tests, bench_scan, recurrence sweep
#   OUT=/tmp/h200 BUDGET=240 bash scripts/h200_session.sh combo   # alone: passkey training (as recorded, and with
#                                                       # two undecayed delta banks) beside the CUDA build and
#                                                       # GPU tests, capped-age rescoring, then bench_scan and
#                                                       # the recurrence sweep alone
#   OUT=/tmp/h200 bash scripts/h200_session.sh fused      # alone: decode GPU tests, the 1b compiled step with
#                                                       # the fused memory kernel / torch memory / full step
#   OUT=/tmp/h200 bash scripts/h200_session.sh followup   # alone: the 7b compiled step, bench_layer 7b
#   OUT=/tmp/h200 bash scripts/h200_session.sh delta      # alone: delta-rule GPU tests (its Triton pass), then
#                                                       # bench_layer 7b with the Triton pass / the torch pass
#   OUT=/tmp/h200 bash scripts/h200_session.sh verify     # alone: delta-rule, memory and decode GPU tests, the
#                                                       # compiled decoding step (bf16 / fp32 entries), profiled
#   OUT=/tmp/h200 bash scripts/h200_session.sh fusion     # alone: the compiled decoding step without / with
#                                                       # inductor's combo kernels, profiled
#   OUT=/tmp/h200 bash scripts/h200_session.sh trace      # alone: bench_layer 7b with the delta rule eager /
#                                                       # traced by the compiler, profiled; delta-rule GPU tests
#   OUT=/tmp/h200 bash scripts/h200_session.sh scan_trace # alone, short: delta-rule and CUDA scan GPU tests, the
#                                                       # CUDA scan timed, the 7b layer eager / traced delta rule
# DEADLINE (default 580): the second of the phase by which every step has stopped.
#
# Runs share the GPU (small models leave it mostly idle), so steps, not wall time, compare them.
# Each run is stopped by a time budget (it then evaluates and writes its results); the results
# come back in $OUT: logs and runs.tgz (every run's JSON and log; no weights).
set -u
PHASE=${1:?usage: h200_session.sh recall|lm|ablations|passkey|widths|cuda|priority|combo|decode|decode_hf|fused|followup|delta|trace|scan_trace|fusion|verify|studies|recall2}
OUT=${OUT:-runs/h200-out}
RUNS=runs/h200
mkdir -p "$OUT" "$RUNS"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
MMREC=${MMREC:-"python3 -m mm_rec"}
{ nvidia-smi; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; date -u; } > "$OUT/env.txt" 2>&1
SECONDS=0
DEADLINE=${DEADLINE:-580}
left() { local t=$((DEADLINE - SECONDS)); echo $(( t < $1 ? (t > 1 ? t : 1) : $1 )); }  # seconds a step may take

zoology_recipes() {  # the recipes of scripts/quality_studies.py mqar-zoology
    python3 scripts/quality_studies.py mqar-zoology --dry-run --out "$RUNS" > "$RUNS/mqar_commands.txt" 2>&1
}
ZOOLOGY_SETS="--train-sets 64:4:100000,128:8:20000,256:16:20000,256:32:20000,256:64:20000 --test-sets 512:64,256:64,128:8,1024:64"
zoology() {  # name recipe lr budget: train on Zoology's mix, stop after the epoch crossing the budget; a run
    # whose training_state.pt was carried back (carry runs/h200/mqar-zoology/NAME) continues with --resume
    mkdir -p "$RUNS/mqar-zoology/$1"
    local resume=; [ -f "$RUNS/mqar-zoology/$1/training_state.pt" ] && resume=--resume
    timeout -s INT $(($4 + 60)) $MMREC eval --task mqar --protocol zoology --train \
        --config "$RUNS/mqar-zoology/recipes/$2.yaml" --lr "$3" --vocab 8192 --seed 0 --time-budget "$4" \
        $ZOOLOGY_SETS --out "$RUNS/mqar-zoology/$1" $resume >> "$RUNS/mqar-zoology/$1/log.txt" 2>&1 &
}
passkey() {  # name recipe train_budget [overrides]
    local name=$1 recipe=$2 budget=$3; shift 3
    mkdir -p "$RUNS/passkey/$name"
    timeout -s INT $((budget + 200)) $MMREC eval --task passkey --train --config "$recipe" --seed 0 \
        --time-budget "$budget" --lengths 2k,8k,32k,64k,128k --samples 5 --out "$RUNS/passkey/$name" "$@" \
        > "$RUNS/passkey/$name/log.txt" 2>&1 &
}
lm() {  # name recipe data end [overrides]: train until the run ends or SIGINT at second `end` of the session
    local name=$1 recipe=$2 data=$3 end=$4; shift 4
    mkdir -p "$RUNS/lm"
    timeout -s INT $((end - SECONDS)) $MMREC train --config "$recipe" --data "$data" --seed 0 \
        --out "$RUNS/lm/$name" "$@" > "$RUNS/lm/$name.log" 2>&1 &
}
lm_pairs() {  # end: MM-Rec and the Transformer on Tiny Shakespeare and TinyStories
    local data=${DATA:-runs/data}  # the device has no ../shared: copy the two texts there and carry runs/data
    [ -f "$data/tinyshakespeare.txt" ] && [ -f "$data/tinystories_subset.txt" ] ||
        { echo "lm_pairs: $data lacks tinyshakespeare.txt / tinystories_subset.txt (carry them)" >&2; return 1; }
    lm shakespeare_mmrec configs/shakespeare_char.yaml $data/tinyshakespeare.txt $1
    lm shakespeare_transformer configs/shakespeare_char_transformer.yaml $data/tinyshakespeare.txt $1
    lm tinystories_mmrec configs/tinystories_bpe.yaml $data/tinystories_subset.txt $1
    lm tinystories_transformer configs/tinystories_bpe_transformer.yaml $data/tinystories_subset.txt $1
    if [ -n "${LM_VARIANT:-}" ]; then  # e.g. LM_VARIANT=model.decay_init=0.9: MM-Rec again with that override
        lm shakespeare_mmrec_variant configs/shakespeare_char.yaml $data/tinyshakespeare.txt $1 --set $LM_VARIANT
        lm tinystories_mmrec_variant configs/tinystories_bpe.yaml $data/tinystories_subset.txt $1 --set $LM_VARIANT
    fi
}
cuda_build() {  # limit: build the CUDA extension (mm_rec/cuda), its first build's time in cuda_build.txt
    timeout $(left $1) python3 -c "import time, logging; logging.basicConfig(level=logging.INFO); t = time.time(); \
import mm_rec.cuda as c; assert c.load_extension() is not None; print(f'first build {time.time() - t:.1f} s')" \
        > "$OUT/cuda_build.txt" 2>&1
}
cuda_scan_tests() {  # limit: the CUDA scan's GPU tests, stopping at the first failure
    timeout $(left $1) python3 -m pytest -q -m gpu tests/ops/scan/test_scan_cuda.py -x -rf
}
cuda_scan_bench() {  # limit [options]: the CUDA scan alone at the acceptance shapes, its copy in the same run
    local limit=$1; shift
    timeout $(left $limit) python3 benchmarks/bench_scan.py --shapes 8x2048x4096,1x32768x4096 --backends cuda \
        --no-torch "$@" > "$OUT/bench_scan.txt" 2>&1
}
kernel_gpu_tests() {  # the CUDA scan's, the CUDA recurrence's and the memory's GPU tests
    cuda_scan_tests 100
    timeout $(left 120) python3 -m pytest -q -m gpu tests/ops/recurrence/test_recurrence_cuda.py -x -rf
    timeout $(left 90) python3 -m pytest -q -m gpu tests/core/test_memory_gpu.py -x -rf
}
kernel_benches() {  # scan_limit recurrence_limit: bench_scan (Triton and CUDA) and the recurrence's cluster sweep
    timeout $(left $1) python3 benchmarks/bench_scan.py --shapes 8x2048x4096,1x32768x4096 --backends triton,cuda \
        --no-torch > "$OUT/bench_scan.txt" 2>&1
    timeout $(left $2) python3 benchmarks/bench_recurrence.py --shapes 1x32768 --backends triton,cuda \
        --cluster-sizes 1,2,4 > "$OUT/bench_recurrence.txt" 2>&1
}
finish() {
    wait
    tar czf "$OUT/runs.tgz" --exclude='*.safetensors' --exclude='*.pt' --exclude='*.distcp' --exclude=tensorboard \
        --exclude=data "$RUNS"
    # Zoology runs stopped by their budget: their states, to carry back and --resume (16 MiB a file comes back)
    local states; states=$(grep -l '"stopped": "time_budget"' "$RUNS"/mqar-zoology/*/mqar_results.json 2>/dev/null \
        | xargs -r -n1 dirname | sed 's|$|/training_state.pt|')
    if [ -n "$states" ]; then tar czf "$OUT/zoology_states.tgz" $states; fi
    echo "phase $PHASE done in $SECONDS s"
    ls -la "$OUT"
}

case $PHASE in
recall)
    # sharing the GPU: the GPU tests, MQAR under Zoology's protocol (width 128; $ABLATIONS: MM-Rec
    # with one memory piece off at a time), passkey, and (unless WITH_LM= , empty) the language-model pairs
    timeout 240 python3 -m pytest -q -m gpu tests -rf -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1 &
    zoology_recipes
    BUDGET=${BUDGET:-470}
    zoology transformer_w128_lr1e-3 transformer_w128 0.001 $BUDGET
    zoology transformer_w128_lr2.2e-3 transformer_w128 0.0022 $BUDGET
    zoology mmrec_w128_lr2.2e-3 mmrec_w128 0.0022 $BUDGET
    for ablation in ${ABLATIONS:-}; do  # one memory piece off at a time
        zoology "mmrec_w128_${ablation}_lr2.2e-3" "mmrec_w128_${ablation}" 0.0022 $BUDGET
    done
    [ -n "${WITH_LM-1}" ] && lm_pairs $((BUDGET + 60))
    passkey mmrec configs/passkey_mmrec.yaml $((BUDGET - 130))
    passkey transformer configs/passkey_transformer.yaml $((BUDGET - 130))
    finish
    ;;
lm)
    # 1. the layer benchmark alone on the GPU, with the top kernels of each layer
    timeout ${BENCH_TIME:-120} python3 benchmarks/bench_layer.py --preset 7b --shapes ${BENCH_SHAPES:-4x2048} \
        --iters 5 --warmup 2 --compile --profile 20 > "$OUT/bench_layer.log" 2>&1
    echo "bench done at $SECONDS s"
    # 2. sharing the GPU: MM-Rec against the Transformer on both corpora, and the long-document
    #    study (three models trained, then scored); every training stopped by SIGINT at its budget
    END=${END:-575}
    TRAIN_END=$((END - 95))
    [ -n "${WITH_LM:-}" ] && lm_pairs $TRAIN_END
    longdoc() {  # name recipe [overrides]: train (SIGINT saves a checkpoint), then score
        local name=$1 recipe=$2; shift 2
        mkdir -p "$RUNS/longdoc"
        ( timeout -s INT $((TRAIN_END - SECONDS)) $MMREC train --config "$recipe" --seed 0 \
              --out "$RUNS/longdoc/$name" --set training.max_steps=${LONGDOC_STEPS:-1000} \
              training.lr_decay_steps=${LONGDOC_STEPS:-1000} training.eval_interval=250 "$@" \
              > "$RUNS/longdoc/$name.train.log" 2>&1
          timeout $((END - SECONDS)) $MMREC eval --task longdoc --checkpoint "$RUNS/longdoc/$name" \
              --out "$RUNS/longdoc/${name}_eval" > "$RUNS/longdoc/$name.eval.log" 2>&1 ) &
    }
    longdoc mmrec configs/longdoc_mmrec.yaml
    longdoc mmrec_no_memory configs/longdoc_mmrec.yaml model.memory_size_M=0
    longdoc transformer configs/longdoc_transformer.yaml
    finish
    ;;
ablations)
    # MM-Rec at width 128 with one memory piece off at a time (scripts/quality_studies.py ABLATIONS),
    # at the learning rate of the best main run; the ring spans every row, so retention is moot here
    zoology_recipes
    BUDGET=${BUDGET:-300}
    for ablation in ${ABLATIONS:-no_window level2_mean state_input no_conv slot_mean no_ring}; do
        zoology "mmrec_w128_${ablation}_lr${LR:-1e-3}" "mmrec_w128_${ablation}" "${LR:-0.001}" $BUDGET
    done
    finish
    ;;
passkey)
    # MM-Rec trained alone for the recipe's 3000 steps, then (PASSKEY_ABLATIONS) with one memory
    # piece off at a time, each scored at 8K and 32K; the Transformer for reference
    BUDGET=${BUDGET:-420}
    passkey mmrec configs/passkey_mmrec.yaml $BUDGET
    for ablation in ${PASSKEY_ABLATIONS:-}; do  # e.g. "retention=age memory_size_M=0 level2=mean window_size=0"
        passkey "mmrec_${ablation%%=*}" configs/passkey_mmrec.yaml $BUDGET --lengths 8k,32k --set "model.$ablation"
    done
    wait
    # The same trained weights scored with the kept slots' age bias capped at the age part's span
    # (equal to the linear bias at every age the ≤ 2K training showed; docs/quality.md, passkey)
    timeout $(left 300) $MMREC eval --task passkey --checkpoint "$RUNS/passkey/mmrec" --seed 0 \
        --lengths 2k,8k,32k,64k,128k --samples 5 --set model.kept_age_bias=capped \
        --out "$RUNS/passkey/mmrec_capped" > "$RUNS/passkey/mmrec_capped.log" 2>&1
    # PASSKEY_PATHS=1: which read path holds the key at 32K and 128K (the delta rule's read zeroed, or
    # every ring slot masked, at inference; docs/quality.md)
    [ -n "${PASSKEY_PATHS:-}" ] && timeout $(left 300) python3 scripts/passkey_paths.py "$RUNS/passkey/mmrec" \
        --lengths 32768,131072 --rows 4 --device cuda > "$OUT/passkey_paths.txt" 2>&1
    finish
    ;;
widths)
    # MQAR (Zoology) at widths 64 and 256, MM-Rec and the Transformer: the curve over widths with state sizes
    zoology_recipes
    BUDGET=${BUDGET:-420}
    for width in 64 256; do
        zoology "mmrec_w${width}_lr2.2e-3" "mmrec_w${width}" 0.0022 $BUDGET
        zoology "transformer_w${width}_lr2.2e-3" "transformer_w${width}" 0.0022 $BUDGET
    done
    finish
    ;;
cuda)
    # Alone on the GPU (timings): build the CUDA kernels (mm_rec/cuda; build time stated), then per op
    # of $CUDA_OPS (default "scan recurrence"): the scan's GPU tests, bench_scan with Triton and CUDA
    # side by side (bf16 and fp32 b) and the CUDA launch-shape sweep; the recurrence's GPU tests
    # (every cluster size against the float64 loop), bench_recurrence with Triton and the CUDA
    # kernels at cluster sizes 1, 2, 4 and the default rule (per-step latency against the cluster
    # size). Each step stops by second $DEADLINE; the scan's tests after $TEST_LIMIT s (default 150: on
    # 2026-12-07 they had run 37 tests by then).
    CUDA_OPS=" ${CUDA_OPS:-scan recurrence} "
    cuda_build 240
    if [[ $CUDA_OPS == *" scan "* ]]; then
        timeout $(left ${TEST_LIMIT:-150}) python3 -m pytest -q -m gpu tests/ops/scan/test_scan_cuda.py tests/ops/scan/test_scan_triton.py \
            -x -rf > "$OUT/cuda_tests.txt" 2>&1
        # the variants first and without Triton (whose kernels' precompile took 87 s of the 120 on 2026-12-07,
        # so no variant was reached); each variant's table has the default build and the copy of the same run
        { timeout $(left 200) python3 benchmarks/bench_scan.py --shapes 8x2048x4096,1x32768x4096 --backends cuda \
              --no-torch --cuda-variants ${CUDA_VARIANTS:-4x8x8,8x16x2,4x16x4}
          timeout $(left 150) python3 benchmarks/bench_scan.py --shapes 8x2048x4096,1x32768x4096 --backends triton,cuda \
              --no-torch; } > "$OUT/bench_scan.txt" 2>&1
    fi
    if [[ $CUDA_OPS == *" recurrence "* ]]; then
        timeout $(left 200) python3 -m pytest -q -m gpu tests/ops/recurrence/test_recurrence_cuda.py -rf \
            > "$OUT/cuda_recurrence_tests.txt" 2>&1
        timeout $(left 180) python3 benchmarks/bench_recurrence.py --shapes 1x32768,8x2048 --backends triton,cuda \
            --cluster-sizes ${CLUSTER_SIZES:-0,1,2,4} > "$OUT/bench_recurrence.txt" 2>&1
    fi
    finish
    ;;
priority)
    # One call when the device allows only one: the CUDA kernels'
    # build and GPU tests (scan, recurrence), bench_scan without the variant sweep, the recurrence's
    # cluster-size sweep at the acceptance shape. Each step stops by second $DEADLINE.
    cuda_build 240
    kernel_gpu_tests > "$OUT/gpu_tests.txt" 2>&1
    kernel_benches 90 100
    finish
    ;;
combo)
    # One call for issues 14 and 16 together: MM-Rec's passkey training on the GPU while the CUDA kernels
    # build on the CPUs and their GPU tests run beside it (correctness only), then the same weights
    # rescored with the kept slots' age bias capped, then the scan and recurrence benchmarks alone.
    passkey mmrec configs/passkey_mmrec.yaml ${BUDGET:-240} --lengths 2k,8k,32k,128k
    # beside it (steps compare): two of the four delta banks undecayed, the lever of the CPU study
    passkey mmrec_undecayed configs/passkey_mmrec.yaml ${BUDGET:-240} --lengths 2k,8k,32k,128k \
        --set model.undecayed_banks=2
    cuda_build 200
    kernel_gpu_tests > "$OUT/gpu_tests.txt" 2>&1
    wait
    timeout $(left 120) $MMREC eval --task passkey --checkpoint "$RUNS/passkey/mmrec" --seed 0 \
        --lengths 8k,32k,128k --samples 5 --set model.kept_age_bias=capped \
        --out "$RUNS/passkey/mmrec_capped" > "$RUNS/passkey/mmrec_capped.log" 2>&1
    cp "$RUNS/passkey/mmrec/log.txt" "$OUT/passkey.txt"; tail -9 "$RUNS/passkey/mmrec_capped.log" >> "$OUT/passkey.txt"
    cat "$RUNS/passkey/mmrec_undecayed/log.txt" >> "$OUT/passkey.txt"
    kernel_benches 150 70  # bench_scan: ~70 s of it compile the Triton variants
    finish
    ;;
decode)
    # Alone on the GPU (timings): the JAX scan beside Triton, the decode, memory and quantization tests
    # on the GPU, then ms per token of MM-Rec's step path at batch 1/8/64 x context 2K/32K/128K for
    # the 1b preset (7b at batch 1/8), bf16/int8/int4, from a full synthetic state (MM-Rec's state
    # has one size at every position); one forward prefill at 32K as the check of that.
    G="python3 benchmarks/bench_generate.py --new-tokens 64"
    timeout $(left 90) python3 benchmarks/bench_jax_scan.py --shapes 8x2048x4096,1x32768x4096 \
        > "$OUT/jax_scan.txt" 2>&1
    { timeout $(left 150) python3 -m pytest -q -m gpu tests/test_decode_gpu.py tests/core/test_memory_gpu.py
      timeout $(left 60) python3 -m pytest -q tests/test_quantization.py; } > "$OUT/decode_tests.txt" 2>&1
    { timeout $(left 150) $G --presets 1b --batches 1,8,64 --prompts 2K,32K,128K --prefill synthetic \
          --methods mmrec-step --quantize none,int8,int4 --json "$RUNS/gen_1b_mmrec.json"
      timeout $(left 60) $G --presets 1b --batches 1 --prompts 32K --methods mmrec-step,mmrec-forward \
          --json "$RUNS/gen_1b_prefill.json"
      timeout $(left 120) $G --presets 7b --batches 1,8 --prompts 2K,32K --prefill synthetic \
          --methods mmrec-step --quantize none,int8,int4 --json "$RUNS/gen_7b_mmrec.json"
    } > "$OUT/generate.txt" 2>&1
    finish
    ;;
fused)
    # Alone on the GPU: the decode GPU tests (two-graph StepRunner, per-block compile, the fused memory
    # kernel of mm_rec/ops/memory_step, at the 1b memory sizes too), then the compiled 1b step with the
    # fused kernel, with the torch memory step, and with the full (block-closing) step on every token:
    # same run, batches 1 and 8.
    timeout $(left ${TEST_LIMIT:-170}) python3 -m pytest -q tests/ops/memory_step tests/test_decode_gpu.py \
        tests/core/test_memory_gpu.py -x -rf > "$OUT/tests.txt" 2>&1
    G="python3 benchmarks/bench_generate.py --new-tokens 48 --prefill synthetic --prompts 2K"
    timeout $(left 420) $G --methods mmrec-step,mmrec-step-torch-memory,mmrec-step-full --presets 1b --batches 1,8 \
        --compile --json "$RUNS/gen_1b_fused.json" > "$OUT/generate_fused.txt" 2>&1
    finish
    ;;
followup)
    # Alone on the GPU: the 7b compiled step (fused memory kernel, then the torch memory step; never
    # measured: the whole-step compilation took the rest of a call), then the 7b layer at 4 x 2K (the
    # delta rule's factored products now bf16; 56.98 ms before) and 1 x 32K.
    G="python3 benchmarks/bench_generate.py --new-tokens 48 --prefill synthetic --prompts 2K"
    timeout $(left 300) $G --methods mmrec-step,mmrec-step-torch-memory --presets 7b --batches 1 --compile \
        --json "$RUNS/gen_7b_compiled.json" > "$OUT/generate_compiled.txt" 2>&1
    timeout $(left 240) python3 benchmarks/bench_layer.py --preset 7b --shapes 4x2048,1x32768 --iters 3 --warmup 1 \
        --compile --profile 20 > "$OUT/bench_layer.log" 2>&1
    finish
    ;;
delta)
    # Alone on the GPU: the delta rule's GPU tests (the chunk-to-chunk pass as one Triton kernel, at the
    # 7b sizes too), then the 7b layer with that pass and with the torch pass, beside the Transformer.
    timeout $(left ${TEST_LIMIT:-200}) python3 -m pytest -q tests/ops/delta_rule tests/core/test_memory_gpu.py \
        -rf > "$OUT/tests.txt" 2>&1
    timeout $(left 400) python3 benchmarks/bench_layer.py --preset 7b --shapes 4x2048,1x32768 --iters 3 --warmup 1 \
        --layers mmrec,mmrec-torch-delta,transformer --compile --profile ${PROFILE:-15} \
        --json "$RUNS/layer_7b_delta.json" > "$OUT/bench_layer.log" 2>&1
    finish
    ;;
trace)
    # Alone on the GPU: the delta rule's GPU tests (with the traced-and-compiled form against the eager one),
    # then the 7b layer with the delta rule run eagerly (the default) and traced by the compiler
    # (MMREC_TRACE_DELTA_RULE=1), beside the Transformer, profiled, the copies placed: is tracing worth
    # making the default?
    # (the timings first: the tests can also run beside a training, phase recall2 with WITH_TESTS=1).
    # WITH_CUDA=1: the CUDA extension builds on the CPUs meanwhile, and after the layers (instead of the delta
    # rule's tests) the CUDA scan's GPU tests and its forward/backward at the two acceptance shapes
    [ -n "${WITH_CUDA:-}" ] && { cuda_build 200 & }
    timeout $(left ${BENCH_LIMIT:-420}) python3 benchmarks/bench_layer.py --preset 7b --shapes 4x2048,1x32768 \
        --iters 3 --warmup 1 --layers mmrec,mmrec-traced-delta,transformer --compile --profile ${PROFILE:-20} \
        --profile-copies 12 --json "$RUNS/layer_7b_trace.json" > "$OUT/bench_layer.log" 2>&1
    if [ -n "${WITH_CUDA:-}" ]; then
        wait  # (CUDA_TESTS= , empty: the scan's tests ran in an earlier call on this machine)
        [ -n "${CUDA_TESTS-1}" ] && cuda_scan_tests ${TEST_LIMIT:-100} > "$OUT/tests.txt" 2>&1
        cuda_scan_bench 150 ${CUDA_VARIANTS:+--cuda-variants $CUDA_VARIANTS}
    else
        timeout $(left ${TEST_LIMIT:-200}) python3 -m pytest -q tests/ops/delta_rule -rf > "$OUT/tests.txt" 2>&1
    fi
    finish
    ;;
fusion)
    # Alone on the GPU: the compiled decoding step (7b, 1b; batch 1, 2K) without and then with inductor's
    # combo kernels (independent small kernels launched as one; the step runs ~19 element-wise kernels a
    # layer), each run twice in turns; the second profiled (kernel count and time per token).
    for combo in "" "--combo-kernels"; do
        timeout $(left 260) python3 benchmarks/bench_generate.py --new-tokens 48 --prefill synthetic --prompts 2K \
            --methods mmrec-step --presets 7b,1b --batches 1 --compile --rounds 3 --profile 30 $combo \
            > "$OUT/generate${combo:+_combo}.txt" 2>&1
    done
    finish
    ;;
scan_trace)
    # One short call when little device time is left: the CUDA extension's build, the CUDA scan's GPU tests, the
    # scan timed alone at the acceptance shapes (its copy in the same run), the delta rule's GPU tests (the
    # traced-and-compiled form against eager among them), then the 7b layer with the delta rule eager and traced
    # (MMREC_TRACE_DELTA_RULE), same run.
    # (the CUDA scan first: its rewrite is the newest code no GPU has run)
    cuda_build 120
    cuda_scan_tests 80 > "$OUT/tests.txt" 2>&1
    cuda_scan_bench 60
    timeout $(left ${TEST_LIMIT:-150}) python3 -m pytest -q tests/ops/delta_rule -rf >> "$OUT/tests.txt" 2>&1
    timeout $(left 300) python3 benchmarks/bench_layer.py --preset 7b --shapes ${LAYER_SHAPES:-4x2048,1x32768} \
        --iters 3 --warmup 1 --layers mmrec,mmrec-traced-delta --compile \
        --json "$RUNS/layer_7b_trace.json" > "$OUT/bench_layer.log" 2>&1
    finish
    ;;
verify)
    # Alone on the GPU: the GPU tests of the delta rule, the memory and decoding; the compiled decoding step
    # (7b, 1b; batch 1) with the window's and ring's entries in bf16 and in fp32, profiled; the memory step's
    # launch sweep for both entry dtypes; WITH_LAYER=1: bench_layer 7b beside the Transformer, profiled.
    # 120 s ran 96 of the 127 tests on a fresh machine (2026-12-07 22:07): compiles and Triton builds come first;
    # the delta rule last (its traced-and-compiled test compiles longest)
    timeout $(left ${TEST_LIMIT:-240}) python3 -m pytest -q tests/ops/memory_step tests/test_decode_gpu.py \
        tests/core/test_memory_gpu.py tests/ops/delta_rule -rf > "$OUT/tests.txt" 2>&1
    timeout $(left 240) python3 benchmarks/bench_generate.py --new-tokens 48 --prefill synthetic --prompts 2K \
        --methods mmrec-step,mmrec-step-fp32-entries --presets 7b,1b --batches 1 --compile --rounds 2 --profile 40 \
        > "$OUT/generate_profile.txt" 2>&1
    timeout $(left 150) python3 benchmarks/bench_memory_step.py --presets 7b,1b --batches 1,8 \
        --tile-elements 4096,8192,16384 --tiles 1 --warps 4,8 > "$OUT/bench_memory_step.txt" 2>&1
    [ -n "${WITH_LAYER:-}" ] && timeout $(left 300) python3 benchmarks/bench_layer.py --preset 7b \
        --shapes 4x2048,1x32768 --iters 3 --warmup 1 --layers mmrec,transformer --compile --profile ${PROFILE:-30} \
        --profile-copies 20 \
        --json "$RUNS/layer_7b_verify.json" > "$OUT/bench_layer.log" 2>&1
    finish
    ;;
studies)
    # One call for issue 14's open study rows, runs sharing the GPU (at most six: ten ran out of its 80 GB on
    # 2026-12-07): the passkey ablations at 8K and 32K (the recipe and the window and ring off, each for the
    # same $PK_STEPS steps unless the budget stops it first), MM-Rec's Tiny Shakespeare recipe at decay_init
    # 0.5 (carry runs/data; WITH_LM= , empty: none), and the Transformer at width 64 with Zoology's highest
    # rate (it did not learn MQAR at 2.2e-3). The width curve itself (recorded on 2026-12-07) is phase widths.
    BUDGET=${BUDGET:-380}
    export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
    zoology_recipes
    zoology "transformer_w64_lr1e-2" "transformer_w64" 0.01 $BUDGET
    passkey ablate_none configs/passkey_mmrec.yaml $BUDGET --lengths 8k,32k --steps ${PK_STEPS:-1200}
    for ablation in ${PASSKEY_ABLATIONS:-window_size=0 memory_size_M=0}; do
        passkey "ablate_${ablation%%=*}" configs/passkey_mmrec.yaml $BUDGET --lengths 8k,32k \
            --steps ${PK_STEPS:-1200} --set "model.$ablation"
    done
    if [ -n "${WITH_LM-1}" ]; then
        lm shakespeare_mmrec configs/shakespeare_char.yaml runs/data/tinyshakespeare.txt $((DEADLINE - 60))
    fi
    wait
    for f in "$RUNS"/passkey/ablate_*/log.txt; do echo "== $f"; tail -25 "$f"; done > "$OUT/passkey_ablations.txt"
    for f in "$RUNS"/mqar-zoology/*/log.txt; do echo "== $f"; tail -12 "$f"; done > "$OUT/mqar.txt"
    if [ -n "${WITH_LM-1}" ]; then
        for f in "$RUNS"/lm/*.log; do echo "== $f"; grep -i 'val' "$f" | tail -40; done > "$OUT/lm.txt"
    fi
    finish
    ;;
recall2)
    # One call for issue 14's open GPU rows: MM-Rec's two language-model recipes at their decay_init 0.5
    # (carry runs/data; WITH_LM= , empty: none), sharing the GPU with the passkey recipe trained for
    # $BUDGET s and scored at 2K-128K, and (WITH_TRANSFORMER= , empty: not) the Transformer's for as
    # long at up to 12000 steps; then the same weights rescored at 32K and 128K ($RESCORE: in fp32, with the
    # delta banks' decays scaled) and (PATHS=1) which read path holds the key (scripts/passkey_paths.py).
    # (The decode GPU tests and the compiled 1b step were measured on 2026-12-07; phase followup goes on.)
    BUDGET=${BUDGET:-330}
    # MM-Rec only: the Transformers' and MM-Rec's decay_init 0.9 runs are recorded (docs/quality.md, study 3)
    if [ -n "${WITH_LM-1}" ]; then
        lm shakespeare_mmrec configs/shakespeare_char.yaml runs/data/tinyshakespeare.txt $((DEADLINE - 150))
        lm tinystories_mmrec configs/tinystories_bpe.yaml runs/data/tinystories_subset.txt $((DEADLINE - 150))
    fi
    passkey mmrec configs/passkey_mmrec.yaml $BUDGET --lengths 2k,8k,32k,128k
    if [ -n "${WITH_TESTS:-}" ]; then  # correctness only, beside the training (whose steps, not seconds, count):
        # the CUDA extension's build and its scan's GPU tests, then the delta rule's, the memory's and decoding's
        { cuda_build 200
          cuda_scan_tests 120
          timeout $(left ${TEST_LIMIT:-240}) python3 -m pytest -q tests/ops/memory_step tests/ops/delta_rule \
              tests/test_decode_gpu.py tests/core/test_memory_gpu.py -rf; } > "$OUT/tests.txt" 2>&1 &
    fi
    if [ -n "${WITH_TRANSFORMER-1}" ]; then
        # the Transformer with the budget it needs at 2K (it learned the CPU-scale task at 384 in ~1500
        # steps; at 2K 2960 steps were not enough): up to 12000 steps in the same $BUDGET s
        passkey transformer configs/passkey_transformer.yaml $BUDGET --lengths 2k,8k --steps 12000
    fi
    wait
    cp "$RUNS/passkey/mmrec/log.txt" "$OUT/passkey.txt"
    [ -f "$RUNS/passkey/transformer/log.txt" ] && cp "$RUNS/passkey/transformer/log.txt" "$OUT/passkey_transformer.txt"
    # WITH_TESTS=1: the CUDA scan (built above) timed alone at the acceptance shapes, its copy in the same run
    [ -n "${WITH_TESTS:-}" ] && cuda_scan_bench 90
    # the same weights and prompts at 32K and 128K, each way of $RESCORE (';'-separated eval options): in fp32,
    # and with the delta banks' decays scaled (alpha^s: slower forgetting than trained)
    IFS=';' read -ra rescores <<< "${RESCORE-"--precision fp32;--set model.delta_decay_scale=0.5;--set model.delta_decay_scale=0.25"}"
    for options in "${rescores[@]}"; do
        echo "== $options" >> "$OUT/passkey.txt"
        timeout $(left 150) $MMREC eval --task passkey --checkpoint "$RUNS/passkey/mmrec" --seed 0 \
            --lengths 32k,128k --samples 5 $options 2>&1 | tail -12 >> "$OUT/passkey.txt"
    done
    [ -n "${PATHS:-}" ] && timeout $(left 300) python3 scripts/passkey_paths.py "$RUNS/passkey/mmrec" \
        --lengths 32768,131072 --rows 4 --device cuda > "$OUT/passkey_paths.txt" 2>&1
    if [ -n "${WITH_LM-1}" ]; then
        for f in "$RUNS"/lm/*.log; do echo "== $f"; grep -i 'val' "$f" | tail -40; done > "$OUT/lm.txt"
    fi
    finish
    ;;
decode_hf)
    # Alone on the GPU (timings): the Hugging Face Llama of the 1b and 7b presets' sizes (static cache
    # + torch.compile, each compile about a minute) at the (batch, context) cells the acceptance
    # compares, and MM-Rec's step path at the same cells in the same run.
    G="python3 benchmarks/bench_generate.py --new-tokens 64"
    { timeout $(left 60) $G --presets 1b --batches 1,8 --prompts 2K,32K --prefill synthetic --methods mmrec-step \
          --json "$RUNS/gen_1b_mmrec_same_run.json"
      timeout $(left 240) $G --presets 1b --batches 1 --prompts 2K,32K,128K --methods hf-llama \
          --json "$RUNS/gen_1b_hf_b1.json"
      timeout $(left 90) $G --presets 1b --batches 8 --prompts 32K --methods hf-llama --json "$RUNS/gen_1b_hf_b8.json"
      timeout $(left 100) $G --presets 7b --batches 1 --prompts 2K --methods hf-llama,mmrec-step \
          --prefill synthetic --json "$RUNS/gen_7b_hf.json"
    } > "$OUT/generate_hf.txt" 2>&1
    finish
    ;;
*)
    echo "unknown phase $PHASE"; exit 2
    ;;
esac
