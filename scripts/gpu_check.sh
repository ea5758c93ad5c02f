#!/usr/bin/env bash
# One-shot check of minimind-ray on ONE NVIDIA GPU, offline, in about 8 minutes:
#
#     OUT=/results/dir bash scripts/gpu_check.sh          # or: bash scripts/gpu_check.sh --out DIR [--dry-run]
#
# Steps (each under its own `timeout`, all within GPU_CHECK_BUDGET_S, default 460 s; a step that no longer
# fits, or whose needs are missing, is SKIPPED with the reason):
#   env             nvidia-smi, torch / CUDA / bf16, which of ray and deepspeed import
#   parse           every step's command line parses and its config loads (CPU only, no training)
#   a_pretrain      `minimind train` of recipes/minimind-26m/pretrain.yaml in process, bf16 on cuda, 60 steps
#   b_ray_pretrain  the same through ray_jobs/pretrain.py --use-gpu --num-workers 1 (local Ray)      [ray]
#   c_ray_zero2     the same with --strategy deepspeed --zero-stage 2, 30 steps            [ray + deepspeed]
#   d_generate      `minimind generate --device cuda` from a_pretrain's checkpoint
#   d_ray_eval      ray_jobs/eval.py --use-gpu on a_pretrain's checkpoint                                [ray]
#   e_tests         pytest tests/test_train.py tests/test_eval.py and the MoE grouped-GEMM kernel's test (device
#                   auto is cuda there; a test that compares two runs bit for bit may fail on a GPU without a
#                   fault: read the failures listed)
# tokens/s and MFU are the mean over the log windows after the first (metrics.jsonl); b/a is the Ray path's cost.
#
# Environment: the repository's .venv when there is one; else the image's python3 with PYTHONPATH=<repo>,
# plus any wheels carried in <repo>/.whl (pip install --no-index --find-links .whl into a scratch dir; a
# ray-slim.tar.xz there is unpacked too, for transfers limited to 64 MiB: see /work/shared/tools/gpu_check.sh
# --prepare-wheels for how to make them). Without a GPU (or with --dry-run) only env and parse run.
#
# Output in OUT: summary.txt (the table, rewritten after every step), steps.log (every step's output),
# results.jsonl (`RESULT {json}` lines), metrics/ (each run's metrics.jsonl and config.yaml), samples_gpu.json.
# Checkpoints and other large files stay in GPU_CHECK_WORK (default: a new directory under /tmp).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY=0
OUT="${OUT:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="${2:?--out needs a directory}"; shift 2 ;;
    --out=*) OUT="${1#--out=}"; shift ;;
    --dry-run) DRY=1; shift ;;
    -h | --help) sed -n '2,27p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ -n "$OUT" ] || { echo "gpu_check: give the output folder as OUT=DIR or --out DIR" >&2; exit 2; }
mkdir -p "$OUT/metrics" && OUT="$(cd "$OUT" && pwd)" || exit 2
WORK="${GPU_CHECK_WORK:-$(mktemp -d /tmp/gpu_check_work.XXXXXX)}"
mkdir -p "$WORK/runs" || exit 2
BUDGET="${GPU_CHECK_BUDGET_S:-460}"
START=$(date +%s)
: >"$OUT/steps.log"
: >"$OUT/results.jsonl"
unset RAY_ADDRESS # the Ray steps start their own local Ray
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 \
  PIP_DISABLE_PIP_VERSION_CHECK=1 MINIMIND_CACHE="$WORK/cache"

# ------------------------------------------------------------------------------------ the environment
if [ -x "$ROOT/.venv/bin/python" ]; then
  PY="$ROOT/.venv/bin/python" ENV_NOTE=".venv"
else
  PY="$(command -v python3)" ENV_NOTE="image python3 + PYTHONPATH"
  export PYTHONPATH="$ROOT:$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
  if ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --find-links "$ROOT/.whl" --no-deps --no-compile --target "$WORK/site" \
      "$ROOT"/.whl/*.whl >>"$OUT/steps.log" 2>&1 && ENV_NOTE="$ENV_NOTE + .whl" || ENV_NOTE="$ENV_NOTE (.whl failed)"
  fi
  if [ -f "$ROOT/.whl/ray-slim.tar.xz" ]; then
    tar -xJf "$ROOT/.whl/ray-slim.tar.xz" -C "$WORK/site" >>"$OUT/steps.log" 2>&1 || ENV_NOTE="$ENV_NOTE (ray-slim failed)"
  fi
fi
export PY WORK OUT ROOT DRY

# The python side: `env` (what is usable), `metrics RUN` (tokens/s, MFU), `parse A B C G E` (dry checks).
cat >"$WORK/probe.py" <<'PYEOF'
import contextlib, importlib, importlib.util, io, json, os, runpy, shlex, statistics, sys
from pathlib import Path

def result(**fields):
    print("RESULT " + json.dumps(fields, default=str), flush=True)

def env():
    info, flags = {"python": sys.executable}, {}
    try:
        import torch
        cuda = torch.cuda.is_available()
        info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=cuda)
        if cuda:
            info.update(gpu=torch.cuda.get_device_name(0), bf16=torch.cuda.is_bf16_supported())
        flags.update(torch=True, cuda=cuda, bf16=cuda and info["bf16"])
    except Exception as error:  # noqa: BLE001
        info["torch_error"] = repr(error)[:200]
    for name in ("ray", "deepspeed", "pytest"):
        try:  # a full import where a GPU run will use it; where it only gets parsed, being installed is enough
            if os.environ.get("DRY") == "1":
                ok = importlib.util.find_spec(name) is not None
                info[name] = "installed" if ok else None
            else:
                info[name] = getattr(importlib.import_module(name), "__version__", "ok")
                ok = True
        except Exception as error:  # noqa: BLE001
            ok, info[name] = False, None
            info[name + "_error"] = f"{type(error).__name__}: {error}"[:200]
        flags[name] = ok
    result(probe="env", **info)
    print(f"torch {info.get('torch')} (CUDA {info.get('torch_cuda')}), cuda {info.get('cuda_available')}, "
          f"bf16 {info.get('bf16', '-')}, " + ", ".join(f"{n} {info[n]}" for n in ("ray", "deepspeed", "pytest")))
    for key, value in flags.items():
        print(f"FLAG {key} {int(bool(value))}")

def metrics(run):
    rows = [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [r for r in rows if "tokens_per_second" in r]
    steady = train[1:] or train
    tps = [r["tokens_per_second"] for r in steady]
    mfu = [r["mfu"] for r in steady if r.get("mfu") is not None]
    out = dict(tokens_per_second=round(statistics.mean(tps)) if tps else None,
               mfu=round(statistics.mean(mfu), 4) if mfu else None, windows=len(train),
               last_step=train[-1].get("step") if train else None, last_loss=train[-1].get("loss") if train else None)
    result(probe="metrics", run=run, **out)
    print(f"METRICS {out['tokens_per_second']} {out['mfu']}")
    sys.exit(0 if train else 1)

def parse(a, b, c, g, e):
    from minimind.cli import build_parser
    from minimind.config import load_config, parse_override_args
    from minimind.train.launch import config_from_args
    args, rest = build_parser().parse_known_args(shlex.split(a))
    ca = load_config(args.config, parse_override_args(rest))
    cb = config_from_args("pretrain", shlex.split(b))
    cc = config_from_args("pretrain", shlex.split(c))
    build_parser().parse_args(shlex.split(g))
    text = io.StringIO()
    sys.argv = ["ray_jobs/eval.py", "--help"]
    with contextlib.redirect_stdout(text), contextlib.suppress(SystemExit):
        runpy.run_path("ray_jobs/eval.py", run_name="__main__")
    missing = [f for f in shlex.split(e) if f.startswith("--") and f not in text.getvalue()]
    assert not missing, f"ray_jobs/eval.py has no {missing}"
    assert (ca.runtime.device, ca.runtime.dtype, ca.optim.max_steps) == ("cuda", "bf16", ca.optim.max_steps)
    assert cb.distributed.use_gpu and cb.distributed.num_workers == 1, cb.distributed
    assert (cc.distributed.strategy, cc.distributed.zero_stage) == ("deepspeed", 2), cc.distributed
    result(probe="parse", status="PASS", a_steps=ca.optim.max_steps, b_dir=cb.checkpoint.dir, c_dir=cc.checkpoint.dir)
    print("every step's command line parses and its config loads (train, 2 x ray pretrain, generate, eval)")

if __name__ == "__main__":
    {"env": env, "metrics": metrics, "parse": parse}[sys.argv[1]](*sys.argv[2:])
PYEOF

# ------------------------------------------------------------------------------------ the steps' commands
RECIPE=recipes/minimind-26m/pretrain.yaml
COMMON=(--runtime.dtype bf16 --optim.grad_accum_steps 1 --optim.epochs 50 --optim.warmup_steps 10
  --logging.every_steps 10 --checkpoint.every_steps 1000 --eval.val_fraction 0.02 --eval.max_examples 16)
A_ARGS=(train --config "$RECIPE" --runtime.device cuda "${COMMON[@]}" --optim.max_steps 60
  --checkpoint.dir "$WORK/runs/a_pretrain")
RAY_ARGS=(--config "$RECIPE" --use-gpu --num-workers 1 --cpus-per-worker 2 --storage-path "$WORK/runs" "${COMMON[@]}")
B_ARGS=("${RAY_ARGS[@]}" --name b_ray_pretrain --optim.max_steps 60)
C_ARGS=("${RAY_ARGS[@]}" --name c_ray_zero2 --strategy deepspeed --zero-stage 2 --optim.max_steps 30)
G_ARGS=(generate --checkpoint "$WORK/runs/a_pretrain" --device cuda --max-new-tokens 48 --save "$OUT/samples_gpu.json")
E_ARGS=(--checkpoint "$WORK/runs/a_pretrain" --data data/sample/pretrain.jsonl --format pretrain --use-gpu
  --actors 1 --device cuda --continuation-docs 8 --max-new-tokens 32 --out "$WORK/eval")
# No -x: some of these tests compare two runs bit for bit, which one CPU guarantees and a GPU (atomic adds in
# embedding and attention backward) may not; every failure is listed (-rf) so one of those hides no other.
T_ARGS=(-m pytest tests/test_train.py tests/test_eval.py
  tests/test_model.py::test_the_grouped_gemm_kernel_gives_the_loop_s_outputs_and_gradients_on_a_gpu
  -q -rf -p no:cacheprovider --basetemp "$WORK/pytest")
export A_ARGS_S="${A_ARGS[*]@Q}" B_ARGS_S="${B_ARGS[*]@Q}" C_ARGS_S="${C_ARGS[*]@Q}" G_ARGS_S="${G_ARGS[*]@Q}" \
  E_ARGS_S="${E_ARGS[*]@Q}" T_ARGS_S="${T_ARGS[*]@Q}"

with_metrics() { # run DIR, then the command: tokens/s and MFU of the run even when the command failed
  local run=$1 rc
  shift
  "$@"
  rc=$?
  "$PY" "$WORK/probe.py" metrics "$run" || { [ "$rc" = 0 ] && rc=1; }
  cp "$run/metrics.jsonl" "$OUT/metrics/$(basename "$run").metrics.jsonl" 2>/dev/null
  cp "$run/config.yaml" "$OUT/metrics/$(basename "$run").config.yaml" 2>/dev/null
  return "$rc"
}
step_env() {
  nvidia-smi 2>&1 || echo "nvidia-smi: not usable"
  echo "environment: $ENV_NOTE ($PY)"
  "$PY" "$WORK/probe.py" env
}
step_parse() { "$PY" "$WORK/probe.py" parse "${A_ARGS_S}" "${B_ARGS_S}" "${C_ARGS_S}" "${G_ARGS_S}" "${E_ARGS_S}"; }
step_a() { eval "with_metrics $WORK/runs/a_pretrain $PY -m minimind.cli $A_ARGS_S"; }
step_b() { eval "with_metrics $WORK/runs/b_ray_pretrain $PY ray_jobs/pretrain.py $B_ARGS_S"; }
step_c() { eval "with_metrics $WORK/runs/c_ray_zero2 $PY ray_jobs/pretrain.py $C_ARGS_S"; }
step_g() { eval "$PY -m minimind.cli $G_ARGS_S"; }
step_e() { eval "$PY ray_jobs/eval.py $E_ARGS_S"; }
step_t() { eval "$PY $T_ARGS_S"; }
export ENV_NOTE
export -f with_metrics step_env step_parse step_a step_b step_c step_g step_e step_t

# ------------------------------------------------------------------------------------ the step machinery
ROWS=()
declare -A TPS MFU FLAG
write_summary() {
  {
    printf 'minimind-ray GPU check: %s; %s s of %s s budget; out %s\n\n' "$ENV_NOTE" "$(($(date +%s) - START))" \
      "$BUDGET" "$OUT"
    printf '%-15s %-8s %5s %11s %7s  %s\n' step status secs tokens/s MFU note
    printf '%s\n' "${ROWS[@]}"
  } >"$OUT/summary.txt"
}
record() { # name status secs note
  ROWS+=("$(printf '%-15s %-8s %5s %11s %7s  %s' "$1" "$2" "$3" "${TPS[$1]:--}" "${MFU[$1]:--}" "${4:0:150}")")
  write_summary
  echo "[gpu_check] $1: $2 ${3}s ${4:0:150}"
}
skip() { record "$1" SKIP 0 "$2"; }
run_step() { # name timeout_s min_needed_s function
  local name=$1 limit=$2 need=$3 fn=$4 rem t0 rc status note log="$WORK/$1.log"
  rem=$((START + BUDGET - $(date +%s)))
  if [ "$rem" -lt "$need" ]; then skip "$name" "budget: ${rem}s left, needs ~${need}s"; return 1; fi
  [ "$limit" -gt "$rem" ] && limit=$rem
  echo "[gpu_check] === $name (timeout ${limit}s)"
  t0=$(date +%s)
  (cd "$ROOT" && timeout -k 10 "$limit" bash -c "$fn" </dev/null) >"$log" 2>&1
  rc=$?
  case $rc in 0) status=PASS ;; 124 | 137) status=TIMEOUT ;; *) status="FAIL($rc)" ;; esac
  if [ "$status" = TIMEOUT ] && [[ $name == *ray* ]] && [ "${GPU_CHECK_RAY_STOP:-1}" = 1 ]; then
    # a killed driver can leave its local Ray holding the GPU (the check's machine is assumed to be its own)
    timeout 30 "$PY" -m ray.scripts.scripts stop --force >>"$log" 2>&1
  fi
  { printf '\n===== %s  %s  %ss\n' "$name" "$status" "$(($(date +%s) - t0))"; tail -c 1000000 "$log"; } >>"$OUT/steps.log"
  grep '^RESULT ' "$log" | sed "s/^RESULT /RESULT {\"step\": \"$name\", \"result\": /; s/\$/}/" >>"$OUT/results.jsonl"
  read -r TPS[$name] MFU[$name] < <(grep '^METRICS ' "$log" | tail -1 | cut -d' ' -f2-) || true
  while read -r _ key value; do FLAG[$key]=$value; done < <(grep '^FLAG ' "$log")
  note=$(grep -E '[0-9]+ (passed|failed)|Error|error:|^\[done\]' "$log" | tail -1)
  [ -n "$note" ] || note=$(grep -Ev '^(RESULT|FLAG|METRICS) |^\s*$' "$log" | tail -1)
  record "$name" "$status" "$(($(date +%s) - t0))" "$note"
  [ "$status" = PASS ]
}
finish() {
  write_summary
  [ "$DRY" = 1 ] && [ -z "${GPU_CHECK_WORK:-}" ] && rm -rf "$WORK"
  echo
  cat "$OUT/summary.txt"
  echo "[gpu_check] done in $(($(date +%s) - START)) s; results in $OUT"
}
trap finish EXIT

# ------------------------------------------------------------------------------------ run
echo "[gpu_check] repo $ROOT; out $OUT; work $WORK; budget ${BUDGET}s; $ENV_NOTE"
run_step env 60 10 step_env
run_step parse 90 10 step_parse
GPU_REASON=""
if [ "$DRY" = 1 ]; then GPU_REASON="no GPU (--dry-run)"
elif ! command -v nvidia-smi >/dev/null 2>&1; then GPU_REASON="no GPU (no nvidia-smi)"
elif [ "${FLAG[cuda]:-0}" != 1 ]; then GPU_REASON="no GPU (torch.cuda.is_available() is false or torch missing)"
elif [ "${FLAG[bf16]:-0}" != 1 ]; then echo "[gpu_check] this GPU lacks bf16: the bf16 runs will fail"
fi
need() { # reason a step cannot run, or nothing: GPU first, then the packages named
  [ -n "$GPU_REASON" ] && { echo "$GPU_REASON"; return; }
  local pkg
  for pkg in "$@"; do [ "${FLAG[$pkg]:-0}" = 1 ] || { echo "$pkg does not import (see env)"; return; }; done
}
maybe() { # name timeout min_needed function packages...
  local why
  why=$(need "${@:5}")
  if [ -n "$why" ]; then skip "$1" "$why"; else run_step "$1" "$2" "$3" "$4"; fi
}

maybe a_pretrain 120 40 step_a
maybe b_ray_pretrain 130 60 step_b ray
if [ -n "${TPS[a_pretrain]:-}" ] && [ -n "${TPS[b_ray_pretrain]:-}" ] && [ "${TPS[a_pretrain]}" != None ] &&
  [ "${TPS[b_ray_pretrain]}" != None ]; then
  RATIO=$(awk -v b="${TPS[b_ray_pretrain]}" -v a="${TPS[a_pretrain]}" 'BEGIN { printf "%.3f", b / a }')
  echo "RESULT {\"step\": \"b_ray_pretrain\", \"result\": {\"probe\": \"ray_over_in_process_tokens_per_second\", \"ratio\": $RATIO}}" >>"$OUT/results.jsonl"
  record ray_cost INFO 0 "Ray path tokens/s / in-process tokens/s = $RATIO"
fi
maybe c_ray_zero2 120 50 step_c ray deepspeed
if [ -f "$WORK/runs/a_pretrain/latest" ] || [ -n "$GPU_REASON" ]; then
  maybe d_generate 60 20 step_g
  maybe d_ray_eval 90 40 step_e ray
else
  skip d_generate "a_pretrain left no checkpoint"
  skip d_ray_eval "a_pretrain left no checkpoint"
fi
maybe e_tests 200 60 step_t pytest
exit 0
