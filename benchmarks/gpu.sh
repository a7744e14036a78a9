#!/usr/bin/env bash
# Step and memory benchmarks on a GPU (issue 13), with bf16 autocast of the network.
#
#   benchmarks/gpu.sh            # from the repository root; results in results/gpu/ (override with OUT=...)
#
# On a CUDA machine it runs `taskvec bench step` on the GPU: MobileNetV2 (48 px) with n = 1, 4, 16, 64
# and fp32/bf16 banks, then the CLIP ViT-B/32-shaped encoder (224 px) with n = 8 and 21; each table
# gives the step time against a plain fine-tuning step, the memory-traffic floor (from a large device
# copy) and peak GPU memory, each composing row once eagerly and once replayed as CUDA graphs
# (Composer(cuda_graphs=True)). On a GPU, bf16 banks are read by one bf16 x bf16 -> fp32 product per
# block. Without CUDA it runs the same commands on tiny CPU models, so the script itself is tested
# anywhere (CI never needs a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-results/gpu}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"

if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  device=cuda
  flags=(--device cuda --autocast --cuda-graphs both)
  step=(--models mobilenet_v2 --vectors 1 4 16 64 --storage fp32 bf16 --batch 256 --resolution 48
        --steps 20 --warmup 5 --rounds 2)
  vit=(--models vit-b32 --vectors 8 21 --storage fp32 bf16 --batch 64 --steps 10 --warmup 3 --rounds 1)
  threads=${THREADS:-8}
  "$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}")' \
    | tee "$OUT/device.txt"
else
  device=cpu
  flags=(--device cpu)
  step=(--models tiny_cnn --vectors 1 4 --storage fp32 bf16 --batch 8 --resolution 16 --steps 2 --warmup 1 --rounds 1)
  vit=(--models tiny_vit --vectors 2 --storage fp32 bf16 --batch 2 --resolution 16 --steps 2 --warmup 1 --rounds 1)
  threads=${THREADS:-2}
  echo "no CUDA device: CPU fallback on tiny models (checks the script, not the GPU)" | tee "$OUT/device.txt"
fi

"$PY" -m taskvec.cli --threads "$threads" bench step "${step[@]}" "${flags[@]}" --json "$OUT/step_$device.json" \
  | tee "$OUT/step_$device.md"
"$PY" -m taskvec.cli --threads "$threads" bench step "${vit[@]}" "${flags[@]}" --json "$OUT/vit_$device.json" \
  | tee "$OUT/vit_$device.md"
echo "tables in $OUT"
