#!/usr/bin/env bash
# Runs benchmark scripts on an offline GPU machine in one go: unpacks the carried bundle (.whl/site.tar.xz,
# `PACK=xz bash ../shared/tools/device-wheels.sh .whl`; or installs loose wheels in .whl, `make bench-wheels`),
# writes one full-size random-weight checkpoint, then runs each named bench against it.
# Results (JSON + markdown) go to $OUT (or bench/results/), one file pair per bench.
#   bench/device_run.sh t3 s3gen quant
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
# BUNDLE=NAME: everything the run writes goes into one $OUT/NAME.tar.gz (the device tool brings back at most 8 files;
# one bench alone writes 8), so several runs in one device call all come back
if [ -n "${BUNDLE:-}" ]; then
  FINAL_OUT=$OUT OUT=/tmp/bundle/$BUNDLE
  trap 'mkdir -p "$FINAL_OUT" && tar czf "$FINAL_OUT/$BUNDLE.tar.gz" -C "$OUT" .' EXIT
fi
mkdir -p "$OUT"
if [ -f .whl/site.tar.xz ]; then
  mkdir -p /tmp/site && tar xJf .whl/site.tar.xz -C /tmp/site
  export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
  for w in .whl/py_spy*.whl; do   # py-spy, when carried beside the bundle: `py-spy dump` of replicas under load
    # (its own target: pip will not add a bin/ to the bundle's existing one)
    [ -f "$w" ] && python3 -m pip install -q --no-index --no-deps --target /tmp/pyspy "$w" \
      && export PATH=/tmp/pyspy/bin:$PATH || true
  done
elif [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export CHATTERBOX_WATERMARK=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1   # the wheel bundle drops Perth's model
CKPT=${CKPT:-/tmp/chatterbox-full}
[ -d "$CKPT" ] || python3 -m serve_app.cli make-checkpoint "$CKPT" --preset full 2>&1 | tail -2   # once per machine
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
if [ "${MPS:-0}" = 1 ]; then   # CUDA MPS, as deploy/gpu-1x.yaml is measured (k8s/README.md)
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mpslog
  mkdir -p /tmp/mps /tmp/mpslog
  pgrep -f nvidia-cuda-mps-control >/dev/null || nvidia-cuda-mps-control -d
fi
# `gpu-tests` runs tests/gpu or $GPU_TESTS (pytest is in the bundle), `soak` bench/soak.py on deploy/gpu-1x.yaml;
# anything else is bench/bench_<name>.py.
# BENCH_ARGS are passed to every bench; STEP_TIMEOUT bounds each step (seconds) so one hang cannot eat the whole device call;
# MPS=1 starts CUDA MPS first.
for b in "$@"; do
  echo ">> $b"
  if [ "$b" = gpu-tests ]; then
    timeout "${STEP_TIMEOUT:-600}" python3 -m pytest ${GPU_TESTS:-tests/gpu} -q -p no:cacheprovider -x 2>&1 \
      | tee "$OUT/gpu-tests.log" | tail -15 || true
  elif [ "$b" = soak ]; then   # the served app under sustained load, VRAM over time (bench/soak.py)
    timeout "${STEP_TIMEOUT:-600}" python3 -m bench.soak --serve "${SOAK_CONFIG:-deploy/gpu-1x.yaml}" \
      --checkpoint "$CKPT" --out "$OUT" ${SOAK_ARGS:---minutes 5 --concurrency 32} 2>&1 \
      | tee "$OUT/soak.log" | grep -v -i warning | tail -40 || true
  else   # the GPU's busy share beside each bench (nvidia-smi dmon, 1 s samples)
    nvidia-smi dmon -s u -d 1 > "$OUT/bench_${b}_dmon.txt" 2>&1 & dmon=$!
    timeout "${STEP_TIMEOUT:-600}" python3 -m "bench.bench_$b" --checkpoint "$CKPT" --out "$OUT" ${BENCH_ARGS:-} 2>&1 \
      | tee "$OUT/bench_$b.log" | grep -v -i warning | tail -40 || true
    kill "$dmon" 2>/dev/null || true
  fi
done
