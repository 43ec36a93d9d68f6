#!/usr/bin/env bash
# The CUDA checks, from the repository root of a machine with an NVIDIA GPU and PyTorch:
#
#     bash benchmarks/gpu_check.sh OUT_DIR
#
# 1. the tests that need CUDA (tests/models/segmenters/test_inference.py, CUDA vs CPU);
# 2. benchmarks/gpu.py: VOC-sized training steps and make-cam by precision and memory format;
# 3. the whole demo pipeline on CUDA (run.device=cuda, AMP and channels_last as configured),
#    its report (quality and each stage's time) beside the CPU figures in docs/BENCHMARKS.md.
# pydensecrf2 has no wheel: where it is missing, its sdist in .whl/ is built into /tmp/site.
set -u
out=$(mkdir -p "${1:-runs/gpu-check}" && cd "${1:-runs/gpu-check}" && pwd)
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
if ! $py -c "import pydensecrf.densecrf" 2>/dev/null; then
    SECONDS=0
    $py -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/site .whl/pydensecrf2-*.tar.gz \
        > "$out/pydensecrf-build.log" 2>&1 || { tail -20 "$out/pydensecrf-build.log"; exit 1; }
    echo "pydensecrf2 built in ${SECONDS}s"
fi
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

echo "== 1. CUDA tests"
timeout 300 $py -m pytest -q -p no:cacheprovider -rs tests/models/segmenters/test_inference.py 2>&1 | tail -5

echo "== 2. speed (benchmarks/gpu.py)"
(cd benchmarks && timeout 300 $py gpu.py --json "$out/gpu.json")

echo "== 3. the demo on CUDA"
demo=/tmp/wsseg-gpu-demo
$py -m wsseg.cli demo-data --out "$demo/data" > /dev/null
SECONDS=0
timeout "${DEMO_TIMEOUT:-420}" $py -m wsseg.cli run-all --config pipelines/demo.yaml --set data.root="$demo/data" \
    --set run.dir="$demo/run" --set run.device=cuda > "$out/demo.log" 2>&1
echo "run-all exit $? after ${SECONDS}s"
$py -m wsseg.cli report --config pipelines/demo.yaml --set data.root="$demo/data" --set run.dir="$demo/run" \
    | tee "$out/demo-report.txt"
