#!/usr/bin/env bash
# GPU checks in one command (a few minutes on one GPU): the GPU tests, then the GPU bench rows
# (the course-sized SeedCNN and ResNet-50, fp32 and bf16: images/s against Captum and the
# roofline; the course CNN compiled too). Runs with the machine's own python3 and its CUDA torch;
# packages it lacks (ray, captum, ...) come as wheels in .whl/ (see README, "Performance on a
# GPU"). Results go to ${OUT:-gpu-check}/ as JSON and a log.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-check}"
mkdir -p "$out"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" || exit 1
status=0
python3 -m pytest -q -m gpu tests/test_gpu.py tests/test_runner_gpus.py -p no:cacheprovider 2>&1 | tee "$out/tests.log" || status=1
for model in seed-cnn resnet50; do
  for precision in fp32 bf16; do
    extra=()
    [ "$model" = resnet50 ] && extra=(--no-captum)
    python3 -m pipeline bench --device cuda --model "$model" --precision "$precision" \
      --image-size 224 --window 32 --stride 16 --n-baselines 3 --images 16 --repeats 3 "${extra[@]}" \
      --json "$out/bench-$model-$precision.json" 2>&1 | tee -a "$out/bench.log" || status=1
  done
done
# the compiled rows apart, so that a failed compile loses no eager row (the course CNN only:
# compiling ResNet-50 for two batch sizes at two precisions would not fit a few minutes)
for precision in fp32 bf16; do
  python3 -m pipeline bench --device cuda --model seed-cnn --precision "$precision" --compile \
    --no-captum --image-size 224 --window 32 --stride 16 --n-baselines 3 --images 16 --repeats 3 \
    --json "$out/bench-seed-cnn-$precision-compiled.json" 2>&1 | tee -a "$out/bench.log" || status=1
done
exit $status
