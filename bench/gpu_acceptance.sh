#!/usr/bin/env bash
# The GPU acceptance run (issue 12): install memk, record the machine, build the kernels, run the
# CUDA tests, the acceptance benchmarks and a capacity slice of the paper's data, then judge the
# issue's targets. Run it from anywhere; it works in the repository it belongs to.
#
#   bash bench/gpu_acceptance.sh [--out DIR] [--wheels DIR] [--copy-to DIR] [--stages LIST]
#                                [--limit STAGE=SECONDS]... [--cpu]
#
#   --out DIR      everything goes here (default gpu-results/)
#   --wheels DIR   also install every .whl in DIR, with no index (Liger-Kernel, cut-cross-entropy)
#   --copy-to DIR  after every stage, put DIR/gpu-results.tar.gz (the whole output folder) and
#                  DIR/summary.txt there: a machine that hands back only a few files still returns
#                  everything that finished, even if the run is killed
#   --stages LIST  run only these stages, comma-separated (a second try), e.g. bench-train,science,report
#   --limit S=N    give stage S a time limit of N seconds instead of its default (repeatable)
#   --cpu          the CPU mode: the same stages at tiny sizes on the CPU, memk's Triton kernels under
#                  Triton's interpreter; CI runs it
#
# Every stage runs under its own time limit (printed before the first starts) with its own log in
# DIR/logs/; a failing stage never stops the next. The exit status is 0 only if every stage
# passed. The targets are benchmarks, not tests: a missed one is a FAIL row in the verdict
# (DIR/verdict.md), not a failed stage. PYTHON names the interpreter (default python3).
set -uo pipefail

SCRIPT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
REPO="$(cd "$(dirname "$SCRIPT")/.." && pwd)"
STAGES_ALL=(install env build tests bench-logprob bench-attention bench-train science report plan)

# ---- one stage's work (run as `gpu_acceptance.sh __stage NAME`, under `timeout`) -------------------

stage_body() {
    local py="$PYTHON"
    case "$1" in
    install)
        # No index on the GPU machine: build with the setuptools already installed.
        if ! "$py" -m pip install --no-deps --no-build-isolation -e "$REPO"; then
            if [ "$MODE" = cpu ] && "$py" -m pip install --no-deps -e "$REPO"; then
                echo "installed with an isolated build (this machine reaches an index)"
            else
                # Too old a setuptools (memk needs >= 77) and no index: put the folders on a path instead.
                echo "pip could not install memk; using the source folders through $OUT/.site on PYTHONPATH"
                mkdir -p "$OUT/.site/memk"
                for d in kernels memorize bench cli csrc; do ln -sfn "$REPO/$d" "$OUT/.site/memk/$d"; done
            fi
        fi
        if [ -n "$WHEELS" ]; then
            shopt -s nullglob
            local wheels=("$WHEELS"/*.whl)
            if [ ${#wheels[@]} -eq 0 ]; then
                echo "no .whl files in $WHEELS"
            else
                "$py" -m pip install --no-deps --no-index "${wheels[@]}" || return 1
            fi
        fi
        with_site "$py" -c "import memk.bench.acceptance, memk.kernels, memk.memorize; print('memk importable')"
        ;;
    env)
        if command -v nvidia-smi >/dev/null; then nvidia-smi >"$OUT/logs/nvidia-smi.txt" 2>&1; fi
        with_site "$py" -m memk.bench.acceptance env --out "$OUT" --device "$DEVICE"
        ;;
    build)
        with_site "$py" -m memk.bench.acceptance build --device "$DEVICE" ${INTERPRETER:+--triton-interpreter}
        ;;
    tests)
        local args=(-m cuda -p no:cacheprovider -o junit_family=xunit1 --junitxml "$OUT/tests/junit.xml" -q -rfEs)
        if "$py" -c "import pytest_timeout" 2>/dev/null; then
            args+=(--timeout "$TEST_TIMEOUT")
        else
            echo "pytest-timeout is not installed: no per-test limit (the stage's limit still holds)"
        fi
        # PYTHONSAFEPATH: the repository root must not be on sys.path (docs/architecture.md: the repository root on sys.path)
        (cd "$REPO" && PYTHONSAFEPATH=1 with_site "$py" -m pytest "${args[@]}" tests)
        local rc=$?
        with_site "$py" -m memk.bench.acceptance junit-summary "$OUT/tests/junit.xml" | tee "$OUT/tests/counts.txt"
        return $rc
        ;;
    bench-*)
        local suite="${1#bench-}"
        local device_slug
        device_slug="$(cat "$OUT/device-slug.txt" 2>/dev/null || echo unknown-device)"
        with_site "$py" -m memk.cli bench --preset acceptance --suite "$suite" --device "$DEVICE" "${BENCH_SIZE[@]}" \
            --json "$OUT/bench/$device_slug-acceptance-$suite.json"
        ;;
    science)
        # The capacity run gets the stage's time less a margin for α, which is read even from a run
        # stopped at its limit (its finished runs are kept in runs.jsonl).
        local cap=$((STAGE_BUDGET > 30 ? STAGE_BUDGET - 15 : STAGE_BUDGET * 2 / 3))
        timeout -k 5 "$cap" env PYTHONPATH="$(site_path)" "$py" -m memk.cli run-capacity \
            --preset paper-1x32 --precision both \
            --device "$DEVICE" --no-progress --out "$OUT/science/run" "${SCIENCE_SIZE[@]}"
        local rc=$?
        with_site "$py" -m memk.bench.acceptance science "$OUT/science/run" --json "$OUT/science/alpha.json" || rc=1
        return $rc
        ;;
    plan)
        # Last: the paper preset's dry run (issue 13), then the verdict again with its row.
        with_site "$py" -m memk.bench.acceptance plan --device "$DEVICE" "${PLAN_SIZE[@]}" --json "$OUT/plan/paper.json"
        local rc=$?
        with_site "$py" -m memk.bench.acceptance verdict "$OUT" >/dev/null || rc=1
        return $rc
        ;;
    report)
        # The benchmarks page's tables from this run's JSON (bench/SUMMARY.md; copy the JSON into
        # bench/results/ and run the report there to update docs/benchmarks.md), then the verdict.
        local rc=0
        with_site "$py" -m memk.bench.report --results "$OUT/bench" --doc "$OUT/bench/no-page.md" || rc=1
        with_site "$py" -m memk.bench.acceptance verdict "$OUT" || rc=1
        return $rc
        ;;
    *)
        echo "unknown stage $1"
        return 2
        ;;
    esac
}

site_path() {  # PYTHONPATH with the fallback source tree, if the install stage had to make one
    if [ -d "$OUT/.site/memk" ]; then echo "$OUT/.site${PYTHONPATH:+:$PYTHONPATH}"; else echo "${PYTHONPATH:-}"; fi
}

with_site() { PYTHONPATH="$(site_path)" "$@"; }

if [ "${1:-}" = __stage ]; then
    read -r -a BENCH_SIZE <<<"$BENCH_SIZE_STR"
    read -r -a SCIENCE_SIZE <<<"$SCIENCE_SIZE_STR"
    read -r -a PLAN_SIZE <<<"$PLAN_SIZE_STR"
    stage_body "$2"
    exit $?
fi

# ---- the driver -------------------------------------------------------------------------------------

usage() { sed -n '2,22p' "$SCRIPT" | sed 's/^# \{0,1\}//'; }

OUT=gpu-results WHEELS="" COPY_TO="" ONLY="" MODE=gpu LIMITS=()
while [ $# -gt 0 ]; do
    case "$1" in
    --out) OUT="${2:?--out needs a folder}"; shift 2 ;;
    --wheels) WHEELS="${2:?--wheels needs a folder}"; shift 2 ;;
    --copy-to) COPY_TO="${2:?--copy-to needs a folder}"; shift 2 ;;
    --stages) ONLY="${2:?--stages needs a list, e.g. bench-train,report}"; shift 2 ;;
    --limit) LIMITS+=("${2:?--limit needs STAGE=SECONDS, e.g. science=240}"); shift 2 ;;
    --cpu) MODE=cpu; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "gpu_acceptance.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
for s in ${ONLY//,/ }; do
    [[ " ${STAGES_ALL[*]} " == *" $s "* ]] || { echo "gpu_acceptance.sh: unknown stage $s; stages: ${STAGES_ALL[*]}" >&2; exit 2; }
done
if [ -n "$WHEELS" ] && [ ! -d "$WHEELS" ]; then
    echo "gpu_acceptance.sh: --wheels $WHEELS is not a folder; give the folder holding the .whl files" >&2
    exit 2
fi
mkdir -p "$OUT"/logs "$OUT"/bench "$OUT"/tests "$OUT"/science "$OUT"/plan || exit 2
OUT="$(cd "$OUT" && pwd)"
[ -n "$WHEELS" ] && WHEELS="$(cd "$WHEELS" && pwd)"
if [ -n "$COPY_TO" ]; then mkdir -p "$COPY_TO" && COPY_TO="$(cd "$COPY_TO" && pwd)" || exit 2; fi

# Time limits in seconds. GPU: ten minutes on an H100 in all (docs/gpu.md says what is measured and
# what is estimated); plan comes last, so a 600-second call that cuts it has every other stage's
# results copied out already. CPU: limits for a 2-core CI machine; the stages take far less.
declare -A BUDGET
if [ "$MODE" = gpu ]; then
    BUDGET=([install]=20 [env]=15 [build]=80 [tests]=90 [bench-logprob]=60 [bench-attention]=30
            [bench-train]=110 [science]=130 [report]=20 [plan]=50)
    DEVICE=cuda INTERPRETER="" TEST_TIMEOUT=30 BENCH_SIZE=()
    # 12 runs (3 models x 2 sizes x 2 precisions) of at most 2500 steps; a step of these models at
    # batch 2048 is estimated at 2-5 ms on an H100 (unmeasured): about two minutes of training
    # The paper's 1x32 at V 2048, S 64 on 400 and 980 sequences (issue 21), full batch, float32 as
    # one ensemble and bfloat16 weights alone: estimated 2-4 ms a step on an H200, unmeasured.
    SCIENCE_SIZE=(--batch-size 2048 --max-steps 10000)
    # The paper's grid planned: a probe of about a second per group (eager; compiling is tried
    # only by a real run), 20 groups. Last, so that a run cut at the call's limit loses only it.
    PLAN_SIZE=(--preset paper)
else
    BUDGET=([install]=120 [env]=30 [build]=150 [tests]=150 [bench-logprob]=90 [bench-attention]=90
            [bench-train]=90 [science]=90 [report]=60 [plan]=60)
    DEVICE=cpu INTERPRETER=1 TEST_TIMEOUT=120 BENCH_SIZE=(--quick --triton-interpreter)
    SCIENCE_SIZE=(--models 1x8x1 --sizes 20,40 --batch-size 16 --max-steps 10)
    PLAN_SIZE=(--preset smoke)
    export TRITON_INTERPRET=1
fi
for l in "${LIMITS[@]}"; do
    s="${l%%=*}" n="${l#*=}"
    if [[ " ${STAGES_ALL[*]} " != *" $s "* ]] || ! [[ "$n" =~ ^[1-9][0-9]*$ ]]; then
        echo "gpu_acceptance.sh: --limit $l: give STAGE=SECONDS with a stage of: ${STAGES_ALL[*]}" >&2
        exit 2
    fi
    BUDGET[$s]=$n
done
export OUT MODE WHEELS DEVICE INTERPRETER TEST_TIMEOUT PYTHON="${PYTHON:-python3}" PYTHONUNBUFFERED=1
export BENCH_SIZE_STR="${BENCH_SIZE[*]}" SCIENCE_SIZE_STR="${SCIENCE_SIZE[*]}" PLAN_SIZE_STR="${PLAN_SIZE[*]}"

selected=()
for s in "${STAGES_ALL[@]}"; do
    if [ -z "$ONLY" ] || [[ ",$ONLY," == *",$s,"* ]]; then selected+=("$s"); fi
done

STAGES_TSV="$OUT/stages.tsv"
printf 'stage\tlimit_s\ttook_s\tstatus\n' >"$STAGES_TSV"
total_budget=0
for s in "${selected[@]}"; do total_budget=$((total_budget + BUDGET[$s])); done

# A copy of the working tree without .git (a GPU machine's) takes the commit from MEMK_COMMIT.
commit="$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo "${MEMK_COMMIT:-unknown}")"
header() {
    echo "memk GPU acceptance run, $MODE mode, started $START_DATE, commit $commit, output $OUT"
}
START_DATE="$(date -u +%Y-%m-%dT%H:%M:%SZ)"

header
if [ "$MODE" = gpu ] && ! command -v nvidia-smi >/dev/null; then
    echo "warning: no nvidia-smi here; the GPU stages will fail (--cpu runs the CPU mode)"
fi
echo "stage limits (s):$(for s in "${selected[@]}"; do printf ' %s %s,' "$s" "${BUDGET[$s]}"; done | sed 's/,$//'); total ${total_budget} s ($((total_budget / 60)) min $((total_budget % 60)) s)"

write_summary() {
    {
        header
        echo
        column -t -s $'\t' "$STAGES_TSV" 2>/dev/null || cat "$STAGES_TSV"
        echo
        if [ -f "$OUT/verdict.md" ]; then cat "$OUT/verdict.md"; else echo "(no verdict yet)"; fi
    } >"$OUT/summary.txt"
}

copy_out() {
    [ -n "$COPY_TO" ] || return 0
    local parent base
    parent="$(dirname "$OUT")" base="$(basename "$OUT")"
    tar -czf "$COPY_TO/gpu-results.tar.gz.part" --exclude="$base/.site" --exclude="$base/science/run/checkpoints" \
        -C "$parent" "$base" && mv "$COPY_TO/gpu-results.tar.gz.part" "$COPY_TO/gpu-results.tar.gz"
    cp "$OUT/summary.txt" "$COPY_TO/summary.txt"
}

failed=()
run_start=$(date +%s%N)
for stage in "${selected[@]}"; do
    limit=${BUDGET[$stage]}
    echo
    echo "== $stage (limit ${limit} s), log $OUT/logs/$stage.log"
    t0=$(date +%s%N)
    STAGE_BUDGET=$limit timeout -k 10 "$limit" bash "$SCRIPT" __stage "$stage" >"$OUT/logs/$stage.log" 2>&1
    rc=$?
    took=$(( ($(date +%s%N) - t0) / 1000000 ))
    took_s=$(printf '%d.%d' $((took / 1000)) $(((took % 1000) / 100)))
    if [ $rc -eq 0 ]; then
        status=ok
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        status="TIMED OUT"
    else
        status="FAILED (exit $rc)"
    fi
    [ $rc -eq 0 ] || failed+=("$stage")
    tail -n 12 "$OUT/logs/$stage.log" | sed 's/^/   | /'
    echo "-- $stage: $status in ${took_s} s (limit ${limit} s)"
    printf '%s\t%s\t%s\t%s\n' "$stage" "$limit" "$took_s" "$status" >>"$STAGES_TSV"
    if [ "$stage" = build ] && [ $rc -ne 0 ]; then
        # a build killed mid-way leaves a lock the next build would wait on forever
        PYTHONPATH="$(site_path)" timeout -k 5 30 "$PYTHON" -m memk.bench.acceptance clear-build-lock \
            >>"$OUT/logs/build.log" 2>&1
    fi
    write_summary
    copy_out
done

took=$(( ($(date +%s%N) - run_start) / 1000000000 ))
echo
cat "$OUT/summary.txt"
echo
if [ ${#failed[@]} -eq 0 ]; then
    echo "all ${#selected[@]} stages passed in ${took} s; everything is in $OUT"
    exit 0
fi
echo "${#failed[@]} stage(s) failed: ${failed[*]} (${took} s); logs in $OUT/logs/"
exit 1
