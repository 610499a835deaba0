#!/usr/bin/env bash
# What a newcomer runs, on a fresh clone with empty caches: clone this repository's HEAD into a temporary directory,
# then `make install`, `make run` and `make test` there, and print the wall time of each. Nothing from this checkout's
# .venv, ~/.cache/nova_rt, the HF cache or pip's cache is used (pip still takes the CPU torch wheel the machine
# serves, as a newcomer's pip would).
#
#   scripts/fresh_clone_check.sh            # the whole check (~40 min on 2 cores)
#   KEEP=1 scripts/fresh_clone_check.sh     # keep the temporary clone (runs/quickstart/report.md, logs)
#   SKIP_TEST=1 ...                         # install + make run only
#   CI=1 ...                                # then also `make smoke` and `make test-vllm`, and print CI's total
#                                           # (.ci/run = smoke + test + test-vllm, after the install)
set -euo pipefail
src=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
work=$(mktemp -d "${TMPDIR:-/tmp}/nova-fresh.XXXXXX")
cleanup() { if [ "${KEEP:-0}" = 1 ]; then echo "kept $work"; else rm -rf "$work"; fi; }
trap cleanup EXIT
export NOVA_RT_CACHE="$work/cache/nova_rt" HF_HOME="$work/cache/hf" PIP_CACHE_DIR="$work/cache/pip" \
       XDG_CACHE_HOME="$work/cache" TRITON_CACHE_DIR="$work/cache/triton" TORCH_EXTENSIONS_DIR="$work/cache/torch_ext"
unset VIRTUAL_ENV PYTHONPATH
git clone -q "$src" "$work/nova_rt"
cd "$work/nova_rt"
echo "fresh clone of $(git rev-parse --short HEAD) in $work/nova_rt; logs: $work/*.log"

declare -A took
step() {  # step NAME COMMAND...: run, log, time; on failure show the log's tail and stop
  local name=$1; shift
  local t0=$SECONDS
  if ! "$@" > "$work/$name.log" 2>&1; then
    tail -n 40 "$work/$name.log"
    echo "fresh-clone check: '$*' FAILED after $((SECONDS - t0)) s (log: $work/$name.log)"
    KEEP=1
    exit 1
  fi
  took[$name]=$((SECONDS - t0))
  printf 'fresh-clone check: %-12s %3dm%02ds\n' "$name" $((took[$name] / 60)) $((took[$name] % 60))
}
step install make install
step run make run
grep -A 20 "^## Did the pipeline make the model better" runs/quickstart/report.md | sed -n '1,/^Held-out NLL/p' || true
du -sh runs/quickstart "$NOVA_RT_CACHE" 2>/dev/null | sed 's/^/disk: /'
[ "${SKIP_TEST:-0}" = 1 ] || step test make test
tail -n 3 "$work/test.log" 2>/dev/null || true
if [ "${CI:-0}" = 1 ]; then
  step smoke make smoke
  tail -n 3 "$work/smoke.log"
  step test_vllm make test-vllm
  tail -n 1 "$work/test_vllm.log"
  ci=$((took[install] + took[smoke] + ${took[test]:-0} + took[test_vllm]))
  printf 'fresh-clone check: CI (install + smoke + test + test-vllm) %dm%02ds\n' $((ci / 60)) $((ci % 60))
fi
echo "fresh-clone check: OK (install ${took[install]} s, make run ${took[run]} s${took[test]:+, make test ${took[test]} s}${took[smoke]:+, make smoke ${took[smoke]} s, make test-vllm ${took[test_vllm]} s})"
