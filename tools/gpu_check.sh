#!/usr/bin/env bash
# Prove the kernels and models on a GPU and measure them, in one call: everything goes to OUTDIR.
#
#   bash tools/gpu_check.sh OUTDIR              # a GPU machine after `pip install -e . --no-deps` (at most ~9 minutes:
#                                               # the stages' limits add up to 9.1)
#   bash tools/gpu_check.sh OUTDIR --dry-run    # the whole script on CPU: tiny shapes, CPU backends (CI runs this)
#
# Stages, each with its own time limit; a stage that fails or runs out of time is recorded and the next runs:
#   gpu_tests              pytest -m gpu -x: the Triton forward and every gradient against the sequential reference
#                          (fp32/fp16/bf16, both directions, grouped B/C, L 1..16384, N 16 and 64); Vim-Ti and
#                          VideoMamba-Ti forward+backward on the GPU against the CPU; fullgraph torch.compile of Vim-Ti
#   bench_scan             dim 768, N 16, bf16, batch of 2^18 tokens per length, L 197..16384: ms, GB/s, roofline
#   bench_models_inference Vim-Ti/S vs DeiT-Ti/S at 224, 512, 1024, 1248 px (bf16 autocast; the batch each ran with)
#   bench_models_training  the same models training at 224 px (forward, backward, AdamW)
#   bench_hierarchical     VMamba-T vs Swin-T and MambaVision-T vs ConvNeXt-T at 224 px, inference and training
#   bench_cross_scan       VMamba's 4-direction scan in one launch vs cross-scan copies + scan + merge (stages 1, 3)
#   triton_resources       every Triton kernel variant compiled for sm_80 and sm_90 with this machine's Triton
#   summary                OUTDIR/summary.txt: PASS/FAIL, ratios, device, driver and versions
# $PYTHON (default python3) runs everything.
set -uo pipefail

usage="usage: bash tools/gpu_check.sh OUTDIR [--dry-run]"
[[ $# -ge 1 && $# -le 2 ]] || { echo "$usage" >&2; exit 2; }
out=$1
dry_run=0
if [[ $# -eq 2 ]]; then
    [[ $2 == --dry-run ]] || { echo "$usage" >&2; exit 2; }
    dry_run=1
fi
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.." || exit 2
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
: >"$out/stages.txt"

# stage NAME LIMIT_SECONDS COMMAND...: run it with its output in OUTDIR/NAME.log; record exit status and seconds.
# SIGINT first, so that pytest still writes its report; KILL 20 s later.
stage() {
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit} s)"
    local start=$SECONDS
    timeout -s INT -k 20 "$limit" "$@" >"$out/$name.log" 2>&1
    local status=$?
    echo "$name $status $((SECONDS - start))" >>"$out/stages.txt"
    echo "   exit status $status after $((SECONDS - start)) s"
}

# kernels first, whole models next, the long compile last; any other test file with GPU tests in between
gpu_test_files=(tests/kernels/test_scan_triton.py tests/models/test_scan_models.py)
for file in $(grep -rl --include="test_*.py" "pytest.mark.gpu" tests | sort); do
    [[ " ${gpu_test_files[*]} tests/kernels/test_scan_compile.py " == *" $file "* ]] || gpu_test_files+=("$file")
done
gpu_test_files+=(tests/kernels/test_scan_compile.py)

vim_pair=(vim_tiny_patch16_224 deit_tiny_patch16_224)
training_pair=(vim_small_patch16_224 deit_small_patch16_224)
if ((dry_run)); then
    # tiny shapes and CPU backends; the GPU tests are collected and skip
    vim_pair=(test_vim test_vit)
    training_pair=(test_vim test_vit)
    hierarchical_pairs=(test_vmamba test_vit test_mambavision test_vit)
    models=("${vim_pair[@]}")
    scan_args=(--lengths 8 20 --dim 16 --state 4 --batch 1 --backends native torch)
    inference_args=(--sizes 32 --batch 2)
    training_args=(--sizes 32 --batch 2)
    timing=(--warmup 1 --iters 1)
    hierarchical_args=(--sizes 32 --batch 2)
    cross_args=(--stages 3 --batch 1 --backends native)
    limits=(120 60 60 60 90 60)
else
    models=(vim_tiny_patch16_224 vim_small_patch16_224 deit_tiny_patch16_224 deit_small_patch16_224)
    hierarchical_pairs=(vmamba_tiny_s1l8 swin_tiny_patch4_window7_224 mambavision_tiny convnext_tiny)
    hierarchical_args=(--sizes 224 --batch 128)
    cross_args=(--batch 128)
    scan_args=()
    inference_args=(--sizes 224 512 1024 1248 --batch 128 --scale-batch)
    training_args=(--sizes 224 --batch 64)
    timing=(--warmup 2 --iters 5)
    limits=(210 45 90 45 60 30)
fi

stage gpu_tests "${limits[0]}" "$python" -m pytest -m gpu -x -q -rA -p no:cacheprovider --continue-on-collection-errors \
    --junitxml="$out/gpu_tests.xml" "${gpu_test_files[@]}"
stage bench_scan "${limits[1]}" "$python" tools/bench_scan.py --out "$out" "${scan_args[@]}"
stage bench_models_inference "${limits[2]}" "$python" tools/bench_models.py --models "${models[@]}" --modes inference \
    "${inference_args[@]}" "${timing[@]}" --fit-batch --same-process --out-dir "$out" --tag inference
stage bench_models_training "${limits[3]}" "$python" tools/bench_models.py --models "${models[@]}" --modes training \
    "${training_args[@]}" "${timing[@]}" --fit-batch --same-process --out-dir "$out" --tag training
stage bench_hierarchical "${limits[4]}" "$python" tools/bench_models.py --models $(printf "%s\n" "${hierarchical_pairs[@]}" | awk '!seen[$0]++') \
    "${hierarchical_args[@]}" "${timing[@]}" --fit-batch --same-process --out-dir "$out" --tag hierarchical
stage bench_cross_scan "${limits[5]}" "$python" tools/bench_cross_scan.py --out "$out" "${cross_args[@]}"
if ((dry_run)); then
    echo "== triton_resources: skipped in a dry run (CI compiles every variant in tests/kernels/test_triton_targets.py)"
else
    stage triton_resources 45 env -u TRITON_INTERPRET "$python" tools/triton_resources.py --json "$out/triton_resources.json"
fi
stage summary 30 "$python" tools/gpu_check_summary.py "$out" --speed-pair "${vim_pair[@]}" --training-pair "${training_pair[@]}" \
    --hierarchical-pairs "${hierarchical_pairs[@]}"
cat "$out/summary.txt" 2>/dev/null || cat "$out/summary.log"
# exit status 1 if any stage failed or ran out of time (summary.txt says which)
! awk '$2 != 0 { failed = 1 } END { exit !failed }' "$out/stages.txt"
