#!/usr/bin/env bash
# The GPU checks of issue 6 as one prepared script, for a session that is lent a GPU machine (the
# device tool). It needs the packages the machine's image lacks, built here first:
#
#   ../shared/tools/device-bundle .device "ray[train,serve]==2.60.0" diffusers==0.42.1 pydantic==2.14.4 pydantic_core==2.50.5 \
#     pytest==9.2.0
#   python3 -m pip download -q --no-deps --only-binary=:all: -d .device torchmetrics==1.9.0 lightning-utilities==0.15.3
#   mkdir -p .git/info; echo /.device/ >> .git/info/exclude
#
# torch, transformers and peft come from the machine's image (the tool leaves them out; do not add peft:
# pip would download torch's CUDA wheels with it, over a GB): gpu.txt records their versions. The image's
# package list of 2026-11-17 (/work/.library/device/KINDS.md) has pytest and torchmetrics, which earlier
# notes said it lacked: both are carried anyway (the same torchmetrics version; pytest runs with the
# image's plugins switched off, PYTEST_DISABLE_PLUGIN_AUTOLOAD, as the project needs none).
# torchmetrics comes as its pure-Python wheel alone: given to the tool, its torch requirement pulls the CUDA
# libraries in (a bundle built that way passed 1.3 GB). A peft without LoRA layers' `cast_input_dtype_enabled`
# runs the adapters on float32 inputs (more memory).
#
# (built 2026-11-30 in under 2 minutes: 50.2 MB, plus 1.0 MB of the two wheels, which with the 12.3 MB tracked tree
# fits the 64 MiB the tool carries, about 3.5 MB to spare)
#
# then, with the device tool: run(command="BUDGET=$((T - 40)) bash benchmarks/gpu_check.sh", carry=[".device"],
# timeout_s=T), T about 420 (of the 15 device minutes, start-up takes a few and a rerun must still fit), less
# when `status` says less device time is left.
# What it does, most important first, each step's output under $OUT (or ./gpu-check when $OUT is unset),
# after a preflight (the packages import, torch sees the GPU; else it stops at once and says why):
#   1. benchmarks/gpu_step.py: one SD3-Medium-shaped learner step at 1024 px, batch 2 (issue 6: step time,
#      TFLOP/s against the bf16 peak, peak memory); benchmarks/memory.py --device cuda (generator + critic
#      on one shared base vs two copies, allocated);
#   2. benchmarks/reward_serving.py --device cuda: in-process vs Serve batched vs unbatched (issue 5); the
#      1024-px step of 1. with model.compile (the blocks under torch.compile; its warm-up, which compiles
#      every block variant, timed apart): eager plain diffusers reached 36% of an H200's peak, under the target;
#   3. a short toy DMDR run on Ray with the learner and the rollout actor sharing the GPU (0.5 each);
#   4. the learner step as the SD3 presets run it (1024 px, batch 4 in micro-batches of 2, with gradient
#      checkpointing): its time and memory against the plain step's;
#   5. the placement and bf16 tests on the GPU (tests/test_devices.py, with trainer.device=auto -> cuda);
#   6. the plain learner step at 512 px, batch 4; a short toy DMDR run with the single-process trainer on
#      the GPU; the LoRA adapters' saved activations and step time in bf16 against peft's float32 path
#      (benchmarks/activations.py);
#   7. the serving benchmark again in gradient mode; the policy-gradient (rl.mode=grpo) learner step at
#      1024 px, every transition trained;
#   8. a FLUX.1-dev-shaped learner step (12B parameters, flux-dev-dmdr) at 1024 px, batch 2, with gradient
#      checkpointing;
#   9. step 3's toy Ray run with model.compile=true (learner and rollout actor compiling at once).
# A step whose time limit (+15 s for timeout's kill grace, +15 s for the archive) would end past BUDGET
# seconds (default 500, under the call's 540) is skipped
# and reported as such, so the run returns inside the device tool's limit with everything it measured.
# (The compiled step's compile time is unknown: 9 or more block variants, several with a backward pass; its
# limit is 280 s. For the step-time target alone, eager and compiled side by side, run
# ONLY="gpu_step_1024 gpu_step_1024_compiled" with T about 480 as the first call; steps 1 and 2 whole need
# T about 620, more than one call may take.)
# ONLY="name name ..." runs just those steps (e.g. ONLY="gpu_step_1024 gpu_step_1024_compiled": the step-time
# target alone, eager and compiled side by side).
# The tool brings back at most 8 files from $OUT: every log, report and run directory goes into one
# archive (gpu-check.tgz, written on exit whatever happened), beside the first six benchmark JSONs, and each
# step prints its headline numbers to stdout (the tool's output tail) as it ends.
set -uo pipefail
out=${OUT:-gpu-check}
work=/tmp/gpu-work
rm -rf "$work"  # a warm machine keeps /tmp: nothing of an earlier call may pass for this one's
mkdir -p "$out" "$work"
trap 'tar czf "$out/gpu-check.tgz" --exclude="*.safetensors" --exclude="ray_train" -C "$work" . 2>/dev/null' EXIT
if [ -f .device/bundle.tar.xz ]; then
  mkdir -p /tmp/site && tar xJf .device/bundle.tar.xz -C /tmp/site || echo "WARNING: the bundle did not unpack whole"
  for wheel in .device/*.whl; do [ -f "$wheel" ] && python3 -m zipfile -e "$wheel" /tmp/site; done  # pure-Python extras
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
# Ray kills workers above 95% of the memory the machine reports, and a microVM's reported memory starts low
# and grows with use (/work/.library/device/H200.md): a reward replica or rollout actor killed for that
# would pass for this project's failure
export RAY_memory_monitor_refresh_ms=0
py=${PYTHON:-python3}
budget=${BUDGET:-500}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$py" - <<'PY'
import importlib.metadata as m
def version(name):
    try:
        return m.version(name)
    except m.PackageNotFoundError:
        return None  # (one missing package must not hide the others' versions)
print({name: version(name) for name in ("torch", "diffusers", "transformers", "peft", "ray", "pydantic", "pytest",
                                         "torchmetrics")})
PY
} 2>&1 | tee "$out/gpu.txt"
# Every step below needs these and a GPU: without them each would fail (or fall back to the CPU, and spend
# the whole budget on an SD3-Medium-shaped step), so stop here and say why
# (SD3's class imports diffusers' peft integration: the image's peft must be >= 0.18 beside transformers 5.17; 0.17
# fails to import, as measured on CPU)
if ! "$py" -c 'import torch, peft, ray, pydantic, dmdr_rl; from diffusers import SD3Transformer2DModel; from peft import LoraConfig
assert torch.cuda.is_available(), "torch sees no CUDA device"' \
    2>&1 | tee -a "$out/gpu.txt"; then
  echo "== preflight failed: nothing was run (see the error above)"; exit 2
fi
status=0
headline() {  # the numbers that matter from a benchmark JSON, on one line
  "$py" - "$1" <<'PY' 2>/dev/null || true
import json, sys
r = json.load(open(sys.argv[1]))
keys = ("device", "resolution", "batch", "micro_batch", "gradient_checkpointing", "compile", "warmup_s", "graphs_compiled", "step_s_median", "rollout_s", "tflop_per_step", "achieved_tflops", "fraction_of_peak",
        "model_tflops", "model_fraction_of_peak",
        "fraction_of_matmul", "peak_memory_gib", "peak_memory_reserved_gib", "skipped_updates", "out_of_memory_at_batch",
        "flop_count_error", "losses")
print("   ", {k: r[k] for k in keys if k in r} if "step_s_median" in r else json.dumps(r)[:2500])
PY
}
step() {  # name, time limit in seconds, command...
  local name=$1 limit=$2; shift 2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  if [ $((SECONDS + limit + 15 + 15)) -gt "$budget" ]; then  # timeout's -k 15 grace, and the archive at the end
    echo "== $name: skipped ($SECONDS s used, its limit $limit s would pass the budget of $budget s)"
    status=1; return
  fi
  echo "== $name"
  timeout -k 15 "$limit" "$@" > "$work/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc after $SECONDS s"
  if [ -f "$work/$name.json" ]; then
    # the first six JSONs come back as files (with gpu.txt and the archive: the tool's 8); the rest in the archive
    [ "$(ls "$out" | wc -l)" -lt 7 ] && cp "$work/$name.json" "$out/"
    headline "$work/$name.json"
  else tail -n 12 "$work/$name.log"; fi
  [ $rc -eq 0 ] || status=1
}
# (most important first: issue 6's step and shared-base memory, issue 5's serving ratios, then placement on the GPU)
# (3 warm-up steps, as the compiled step's: the losses of the two reports are then of the same step, comparable)
step gpu_step_1024 110 "$py" benchmarks/gpu_step.py --device cuda --resolution 1024 --batch 2 --warmup 3 \
  --json "$work/gpu_step_1024.json"
step memory 40 "$py" benchmarks/memory.py --device cuda --json "$work/memory.json"
step reward_serving_cuda 100 "$py" benchmarks/reward_serving.py --device cuda --rounds 3 --json "$work/reward_serving_cuda.json"
# (compiling each block variant of SD3-Medium's: not measured yet; the log keeps what the warm-up printed)
# (its log says each warm-up step's time and graphs, and why dynamo recompiled or split a graph)
step gpu_step_1024_compiled 280 env TORCH_LOGS=recompiles,graph_breaks "$py" benchmarks/gpu_step.py --device cuda \
  --resolution 1024 --batch 2 --compile --json "$work/gpu_step_1024_compiled.json"
step ray 100 "$py" -m dmdr_rl.run --preset toy-dmdr trainer.backend=ray ray.learner_gpus=0.5 ray.rollout_gpus=0.5 \
  trainer.max_steps=20 trainer.cold_start=10 output.dir="$work/ray" output.sample_every=20 output.checkpoint_every=20 \
  --num-images 32
# (its FLOPs without the recomputation are counted on the CPU's meta device: 12-18 s of its limit)
step gpu_step_1024_preset 95 "$py" benchmarks/gpu_step.py --device cuda --resolution 1024 --batch 4 --micro-batch 2 \
  --gradient-checkpointing --json "$work/gpu_step_1024_preset.json"
step tests 90 env PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 "$py" -m pytest -q -p no:cacheprovider tests/test_devices.py
step gpu_step_512 80 "$py" benchmarks/gpu_step.py --device cuda --resolution 512 --batch 4 --json "$work/gpu_step_512.json"
step local 60 "$py" -m dmdr_rl.run --preset toy-dmdr trainer.backend=local trainer.device=cuda trainer.max_steps=20 \
  trainer.cold_start=10 'rewards.0.kwargs={device: cuda}' output.dir="$work/local" output.sample_every=20 \
  output.checkpoint_every=20 --num-images 32
step activations-1024 45 "$py" benchmarks/activations.py --device cuda --resolution 1024 \
  --json "$work/activations-1024.json"
# (the JSONs from here on stay in the archive: the tool brings back 8 files; the numbers print to stdout)
step reward_serving_cuda_grad 90 "$py" benchmarks/reward_serving.py --device cuda --rounds 2 --grad \
  --json "$work/reward_serving_cuda_grad.json"
step gpu_step_1024_grpo 110 "$py" benchmarks/gpu_step.py --device cuda --resolution 1024 --batch 2 --rl grpo --transitions all \
  --json "$work/gpu_step_1024_grpo.json"
step gpu_step_flux_1024 150 "$py" benchmarks/gpu_step.py --shape flux-dev --device cuda --resolution 1024 --batch 2 \
  --gradient-checkpointing --json "$work/gpu_step_flux_1024.json"
# (the learner and the rollout actor compiling at once on one GPU, 8 compile workers each)
step ray_compiled 200 env TORCHINDUCTOR_COMPILE_THREADS=8 "$py" -m dmdr_rl.run --preset toy-dmdr trainer.backend=ray \
  ray.learner_gpus=0.5 ray.rollout_gpus=0.5 model.compile=true trainer.max_steps=20 trainer.cold_start=10 \
  output.dir="$work/ray_compiled" output.sample_every=20 output.checkpoint_every=20 --num-images 32
exit $status
