#!/bin/bash
# GPU check: the CUDA tests, then `onnxdgh generate` on each sample on the GPU and on the
# same machine's CPU cores. Usage, from the repository root of an installed checkout:
#   bash tools/gpu_check.sh OUTDIR
# (set EXTRA_PYTHONPATH to a folder holding onnx2torch where it is not installed).
# Writes OUTDIR/pytest.log, OUTDIR/<model>_<device>.json (generation reports) and the
# GPU-generated .npz sets; prints one timing line per run.
set -u
out=${1:?usage: bash tools/gpu_check.sh OUTDIR}
mkdir -p "$out"
export PYTHONPATH=$PWD${EXTRA_PYTHONPATH:+:$EXTRA_PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi -L; echo "cpu cores: $(nproc)"
python3 -c "import torch, onnx, onnxruntime, numpy; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'onnx', onnx.__version__, 'onnxruntime', onnxruntime.__version__, 'numpy', numpy.__version__)"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_generate.py 2>&1 | tee "$out/pytest.log" | tail -5
for spec in "fmnist_resnet8 cuda" "fmnist_mobilenetv2 cuda" "fmnist_resnet8_silu cuda" "fmnist_resnet8 cpu"; do
  set -- $spec
  images=$out/$1_$2.npz
  [ "$2" = cpu ] && images=$(mktemp --suffix .npz)
  timeout 120 python3 -m onnxdgh -q generate "samples/$1.onnx" -o "$images" --device "$2" --seed 0 --json "$out/$1_$2.json"
  echo "rc=$? $1 $2"
done
OUT=$out python3 - <<'PY'
import glob, json, os
for path in sorted(glob.glob(os.path.join(os.environ["OUT"], "*.json"))):
    report = json.load(open(path))
    timings, final = report["timings"], report["final"]
    print(os.path.basename(path), "total_s", timings["total_s"], "optimise_s", timings["optimise_s"],
          "image_iterations_per_s", timings["image_iterations_per_s"],
          "bns_loss", round(final["bns_loss_initial"], 4), "->", round(final["bns_loss"], 4))
PY
