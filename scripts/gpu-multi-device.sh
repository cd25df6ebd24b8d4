#!/usr/bin/env bash
# The multi-device checks of docs/multi-device.md on a GPU machine (H100/H200, CUDA 13 driver).
#
#   scripts/gpu-multi-device.sh BIN [OUT_DIR]
#
# BIN: a `step3` binary built with `--features cuda,nccl` (../shared/tools/cuda-build.sh -p
# step3-cli --features cuda,nccl --bin step3), optionally xz-compressed (BIN.xz). Run from the
# repository root. Writes the logs to OUT_DIR (default: gpu-multi-device-out/) and exits non-zero
# if a verify fails. What it runs:
#   1. verify on cuda, f32 and bf16, TP 1 with the routed experts in host memory (--moe-device cpu);
#   2. with two or more GPUs: verify again split over two ranks (--tp 2 via NCCL);
#   3. bench engine on the bundled demo checkpoint, experts on the device, then on the host;
#   4. bench all (device ceilings, attention, MoE and decode layers).
set -uo pipefail

bin=${1:?usage: $0 BIN [OUT_DIR]}
out=${2:-gpu-multi-device-out}
mkdir -p "$out"

if [[ ! -x $bin && -f $bin.xz ]]; then
  python3 -c "import lzma,shutil,sys;shutil.copyfileobj(lzma.open(sys.argv[1]+'.xz'),open(sys.argv[1],'wb'))" "$bin"
  chmod +x "$bin"
fi
env_script=$(dirname "$bin")/cuda-run-env.sh
# shellcheck disable=SC1090
[[ -f $env_script ]] && . "$env_script"

fixtures=tests/fixtures/step3-tiny
status=0
run() {  # run NAME CMD...: log to OUT/NAME.log, record the exit status
  local name=$1; shift
  echo "== $name: $*" | tee -a "$out/summary.txt"
  local start=$SECONDS
  "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "   exit $rc after $((SECONDS - start)) s; $(tail -n 1 "$out/$name.log")" | tee -a "$out/summary.txt"
  return $rc
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpus.csv" 2>&1
gpus=$(($(wc -l <"$out/gpus.csv") - 1))
echo "GPUs: $gpus" | tee "$out/summary.txt"

for dtype in f32 bf16; do
  run "verify-$dtype-host-experts" "$bin" verify --fixtures "$fixtures" --device cuda --dtype "$dtype" \
    --moe-device cpu || status=1
done
if ((gpus >= 2)); then
  run verify-f32-tp2 "$bin" verify --fixtures "$fixtures" --device cuda --dtype f32 --tp 2 || status=1
  run verify-f32-ep2-host "$bin" verify --fixtures "$fixtures" --device cuda --dtype f32 --ep 2 --moe-device cpu || status=1
fi
for experts in device cpu; do
  run "bench-engine-demo-experts-$experts" "$bin" bench engine --model-dir demo/step3-demo --device cuda \
    --concurrency 1,16 --prompt-len 128 --gen-len 32 --moe-device "$experts"
done
run bench-all "$bin" bench all --device cuda
echo "logs in $out/; verify status $status" | tee -a "$out/summary.txt"
exit $status
