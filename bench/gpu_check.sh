#!/usr/bin/env bash
# The prepared check of the CUDA path, for a machine with an NVIDIA GPU (a lent one has PyTorch, ONNX Runtime,
# pytest and the pipeline's other packages but no network and no dvc, so the stages run as dvc.yaml runs them:
# python -m stages.<name>). It prints the GPU, runs tests/test_cuda.py, then the default recipe on the real
# CIFAR-10 JPEG copy twice with train.deterministic (the two models must be bit-identical), evaluate, export (ONNX
# Runtime checked against the CUDA-trained weights) and predict on a few test images, with timings and a verdict
# on the accuracy against the CPU figure (91.40%, BENCHMARKS.md).
#
# The data set does not travel with the repository (../shared is beside it): copy it into an ignored folder first.
#   mkdir -p .gpu && cp ../shared/datasets/cifar10-jpeg.zip .gpu/      (.gitignore ignores .gpu/)
#   then, with the device tool: command "bash bench/gpu_check.sh", carry [".gpu"], timeout_s 600
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1 DVC_NO_ANALYTICS=1
PYTHON=${PYTHON:-python3}
DATA=${DATA:-.gpu/cifar10-jpeg.zip}
CPU_ACCURACY=0.914   # the default recipe on the CPU (BENCHMARKS.md, time to accuracy)
TOLERANCE=0.005

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device",
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")'

echo "== tests that need CUDA"
"$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cuda.py

[ -f "$DATA" ] || { echo "skipped the real-data run: $DATA not found (see the header of this script)"; exit 0; }
work=$(mktemp -d /tmp/gpu-check-XXXXXX)
cp -r stages params.yaml "$work"/
mkdir -p "$work/data/sources"
ln -s "$(realpath "$DATA")" "$work/data/sources/cifar10-jpeg.zip"
cd "$work"
"$PYTHON" - <<'EOF'
import yaml
params = yaml.safe_load(open("params.yaml"))
params["data"]["source"] = "data/sources/cifar10-jpeg.zip"
params["train"]["deterministic"] = True
params["report"]["baseline"] = None
yaml.safe_dump(params, open("params.yaml", "w"), sort_keys=False)
EOF

stage() {  # one stage as dvc.yaml runs it, timed
  local start=$SECONDS
  "$PYTHON" -m "stages.$1" > "log-$1-$2.txt" 2>&1 || { tail -20 "log-$1-$2.txt"; exit 1; }
  echo "$1 ($2): $((SECONDS - start)) s"
}
echo "== the default recipe on the real CIFAR-10 JPEG copy, in $work"
stage download 1
stage normalize 1
stage train 1
first=$(md5sum models/model.pth | cut -d' ' -f1)
cp metrics/train_time.json train_time-1.json
stage train 2
second=$(md5sum models/model.pth | cut -d' ' -f1)
stage evaluate 1
stage export 1
"$PYTHON" - <<'EOF'
import io, torch
from PIL import Image
images = torch.load("data/prepared/test.pt", weights_only=True)["images"][:4]
for index, image in enumerate(images):
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(f"test{index}.png")
EOF
"$PYTHON" -m stages.predict models/model.pth test0.png test1.png test2.png test3.png --top-k 1
"$PYTHON" -m stages.predict models/model.onnx test0.png test1.png test2.png test3.png --top-k 1

echo "== results"
cat train_time-1.json metrics/train_time.json
"$PYTHON" - "$first" "$second" "$CPU_ACCURACY" "$TOLERANCE" <<'EOF'
import json, sys
first, second, cpu, tolerance = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
accuracy = json.load(open("metrics/test.json"))["test"]["acc"]
precision = json.load(open("metrics/train.json"))["precision"]
print(f"test accuracy {accuracy:.4f} ({precision}); CPU figure {cpu:.3f} +- {tolerance}: "
      f"{'PASS' if abs(accuracy - cpu) <= tolerance else 'FAIL'}")
print(f"two deterministic runs: {'bit-identical' if first == second else 'DIFFER'} ({first} / {second})")
EOF
