#!/usr/bin/env bash
# The GPU checks of issue 6 as one prepared script, for a session that is lent a GPU machine (the
# device tool). It needs the packages the machine's image lacks, built here first:
#
#   ../shared/tools/device-bundle .device "ray[train,serve]==2.60.0" diffusers==0.42.1 pydantic==2.14.4 pydantic_core==2.50.5
#   echo /.device/ >> .git/info/exclude
#
# (built 2026-11-28 in about 3 minutes: 49.9 MB, which with the 11.8 MB tracked tree fits the 64 MiB the tool carries)
#
# then, with the device tool: run(command="bash benchmarks/gpu_check.sh", carry=[".device"], timeout_s=540).
# What it does, each step's output under $OUT (or ./gpu-check when $OUT is unset):
#   1. the placement and bf16 tests on the GPU (tests/test_devices.py, with trainer.device=auto -> cuda);
#   2. a short toy DMDR run with the single-process trainer on the GPU;
#   3. a short toy DMDR run on Ray with the learner and the rollout actor on the GPU (NCCL, 0.5 GPU each);
#   4. benchmarks/gpu_step.py: one SD3-Medium-shaped learner step at 512 px (batch 4) and 1024 px (batch 2).
set -uo pipefail
out=${OUT:-gpu-check}
mkdir -p "$out"
if [ -f .device/bundle.tar.xz ]; then
  mkdir -p /tmp/site && tar xJf .device/bundle.tar.xz -C /tmp/site
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
status=0
step() {  # name, timeout in seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc"; tail -n 4 "$out/$name.log"
  [ $rc -eq 0 ] || status=1
}
step tests 120 "$py" -m pytest -q -x -p no:cacheprovider tests/test_devices.py
step local 90 "$py" -m dmdr_rl.run --preset toy-dmdr trainer.backend=local trainer.device=cuda trainer.max_steps=20 \
  trainer.cold_start=10 output.dir=/tmp/gpu-local output.sample_every=20 output.checkpoint_every=20
step ray 150 "$py" -m dmdr_rl.run --preset toy-dmdr trainer.backend=ray ray.learner_gpus=1 ray.rollout_gpus=0.5 \
  trainer.max_steps=20 trainer.cold_start=10 output.dir=/tmp/gpu-ray output.sample_every=20 output.checkpoint_every=20
step step512 90 "$py" benchmarks/gpu_step.py --resolution 512 --batch 4 --json "$out/gpu_step_512.json"
step step1024 120 "$py" benchmarks/gpu_step.py --resolution 1024 --batch 2 --json "$out/gpu_step_1024.json"
exit $status
