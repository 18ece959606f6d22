#!/usr/bin/env bash
# The GPU check: what a developer lent a CUDA machine runs once, in the repository root.
#
#   bash benchmarks/gpu_check.sh                  # CUDA: tests, speed (bf16 and fp32), learning matrix at 20 s a cell
#   bash benchmarks/gpu_check.sh --device cpu --smoke   # the script's own logic, on any machine (as the test suite does)
#
# It installs nothing from a registry (the device machines reach none): Python packages missing
# there travel as wheels in .whl/ (see the device tool's README), installed with --no-index into
# /tmp/site. The machine's own torch is used and its version is reported. Without gradio the app
# path of the speed benchmark is skipped, and said so.
#
# Everything it prints also goes to $OUT_DIR (default benchmarks/out/gpu_check, or $OUT/gpu_check
# on a device machine); summary.json there gathers the results, one key per step.
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
CELL_SECONDS=20
SMOKE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --seconds) CELL_SECONDS="$2"; shift 2 ;;
    --smoke) SMOKE=1; shift ;;
    *) echo "unknown argument: $1 (use --device cuda|cpu, --seconds N, --smoke)"; exit 2 ;;
  esac
done
if [ -z "${PY:-}" ]; then  # the project's venv where there is one (here), else the machine's python3 (a device machine)
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT_DIR=${OUT_DIR:-${OUT:+$OUT/gpu_check}}
OUT_DIR=${OUT_DIR:-benchmarks/out/gpu_check}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 GRADIO_ANALYTICS_ENABLED=False
export CWM_BENCH_OUT="$OUT_DIR"  # the benchmarks' logs and pictures go beside the summary

# 1. carried wheels only
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || { echo "installing .whl/ failed"; exit 1; }
fi

status=0
step() {  # step NAME COMMAND...: run, keep its output, note its exit code
  local name=$1; shift
  echo "== $name: $*"
  "$@" > "$OUT_DIR/$name.out" 2> "$OUT_DIR/$name.err"
  local rc=$?
  tail -n 40 "$OUT_DIR/$name.out"
  [ $rc -eq 0 ] || { echo "!! $name failed ($rc):"; tail -n 20 "$OUT_DIR/$name.err"; status=1; }
  echo "$rc" > "$OUT_DIR/$name.rc"
}

# 2. what this machine is
step environment "$PY" -c "
import json, platform, torch
cuda = torch.cuda.is_available()
print(json.dumps({'python': platform.python_version(), 'torch': torch.__version__, 'cuda_available': cuda,
                  'device': torch.cuda.get_device_name() if cuda else 'cpu', 'requested': '$DEVICE'}))"
if [ "$DEVICE" != cpu ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device here: run with --device cpu to check the script itself"; exit 1
fi
HAVE_GRADIO=1
"$PY" -c "import gradio" 2>/dev/null || { HAVE_GRADIO=0; echo "gradio is not installed here: the speed benchmark skips the app path"; }

# 3. the tests that need CUDA, and the engine's own (fixed-seed reference run, models, loop)
TESTS=(tests/test_cuda.py tests/test_reference_run.py tests/test_models.py tests/test_world_model.py)
[ $SMOKE -eq 1 ] && TESTS=(tests/test_cuda.py tests/test_reference_run.py)
step tests "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}"

# 4. speed: bf16 (the default) and fp32, against the commit before the speed work (BASELINE_COMMIT)
SPEED_ARGS=(--device "$DEVICE" --quick)
[ $HAVE_GRADIO -eq 1 ] || SPEED_ARGS+=(--skip-app)
[ $SMOKE -eq 1 ] && SPEED_ARGS+=(--core-iterations 3 --against "" --skip-app)
step speed_default "$PY" benchmarks/bench_world_model.py "${SPEED_ARGS[@]}"
if [ "$DEVICE" != cpu ]; then
  step speed_fp32 "$PY" benchmarks/bench_world_model.py "${SPEED_ARGS[@]}" --precision fp32 --against ""
fi

# 5. the learning matrix on this device: every pattern x seed x source, CELL_SECONDS each, three cells at a time
MATRIX_ARGS=(--matrix --device "$DEVICE" --seconds "$CELL_SECONDS" --every 50 --threads-list 1 --jobs 3 --log gpu_learning_matrix)
[ $SMOKE -eq 1 ] && MATRIX_ARGS=(--matrix --device "$DEVICE" --seconds 2 --every 5 --threads-list 1 --jobs 2
                                 --patterns alternate --seeds 11 --log gpu_check_smoke_matrix)
step learning_matrix "$PY" benchmarks/bench_learning.py "${MATRIX_ARGS[@]}"

# 6. one summary
"$PY" - "$OUT_DIR" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
summary = {}
for name in ("environment", "tests", "speed_default", "speed_fp32", "learning_matrix"):
    rc_file = out / f"{name}.rc"
    if not rc_file.exists():
        continue
    text = (out / f"{name}.out").read_text()
    entry = {"exit_code": int(rc_file.read_text())}
    start = text.find("{")
    if start >= 0:
        try:
            entry["result"] = json.JSONDecoder().raw_decode(text[start:])[0]
        except ValueError:
            pass
    if "result" not in entry:
        entry["tail"] = text.strip().splitlines()[-3:]
    summary[name] = entry
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print("summary:", out / "summary.json")
EOF
exit $status
