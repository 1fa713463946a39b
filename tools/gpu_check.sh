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
# ImageNet-size timing: torchvision ResNet-18 (random weights: the time does not depend
# on them), exported with BN kept as the README says; GPU 20 iterations, CPU 2.
python3 - "$out/resnet18.onnx" <<'PY'
import sys, torch, torchvision
model = torchvision.models.resnet18(weights=None)
gen = torch.Generator().manual_seed(0)
for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):  # non-trivial BN targets
    bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen) * 0.2)
    bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
model.eval()
torch.onnx.export(model, torch.randn(1, 3, 224, 224), sys.argv[1], dynamo=False,
                  training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False, opset_version=17,
                  input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
PY
for spec in "cuda 20" "cpu 2"; do
  set -- $spec
  timeout 150 python3 -m onnxdgh -q generate "$out/resnet18.onnx" -o "$(mktemp --suffix .npz)" --device "$1" --seed 0 \
      --images 64 --batch-size 32 --iterations "$2" --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 --json "$out/resnet18_$1.json"
  echo "rc=$? resnet18 $1"
done
rm -f "$out/resnet18.onnx"
OUT=$out python3 - <<'PY'
import glob, json, os
for path in sorted(glob.glob(os.path.join(os.environ["OUT"], "*.json"))):
    report = json.load(open(path))
    timings, final = report["timings"], report["final"]
    print(os.path.basename(path), "total_s", timings["total_s"], "optimise_s", timings["optimise_s"],
          "image_iterations_per_s", timings["image_iterations_per_s"],
          "bns_loss", round(final["bns_loss_initial"], 4), "->", round(final["bns_loss"], 4))
PY
