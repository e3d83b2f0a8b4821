#!/usr/bin/env bash
# Sets up this checkout and builds what the main job needs: ./preprocess.sh && python3 compute_score.py
# Installs missing Python packages (a CPU-only torch where none is installed), then builds the weights, engines and
# test images for the profile into build/ (idempotent: a rerun with nothing changed reuses everything).
# Options go to `python3 -m engines.build` (e.g. --onnx, --backend tensorrt); CNRT_* variables work too.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[preprocess] installing torch (CPU build; install a CUDA build yourself for a GPU)"
  "$PY" -m pip install -q "torch==2.13.0"
fi
if ! "$PY" -c "import diffusers, transformers, cv2, skimage, safetensors, onnx, onnxruntime, onnx_graphsurgeon" 2>/dev/null; then
  echo "[preprocess] installing the project's dependencies"
  "$PY" -m pip install -q -e .
fi
if ! "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('open_clip') is None)" 2>/dev/null; then
  # Only for its CLIP vocabulary file; --no-deps keeps torchvision out.
  echo "[preprocess] installing open-clip-torch (for the CLIP BPE vocabulary)"
  "$PY" -m pip install -q --no-deps "open-clip-torch==3.3.0"
fi
if "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null \
    && ! "$PY" -c "import cudnn" 2>/dev/null; then
  # cuDNN's graph API for the convolution tuner; without it the tuner chooses among Triton and torch's cuDNN call.
  echo "[preprocess] installing nvidia-cudnn-frontend (cuDNN graph-API convolutions)"
  "$PY" -m pip install -q "nvidia-cudnn-frontend==1.16.0" \
    || echo "[preprocess] nvidia-cudnn-frontend not installed: the tuner will not offer cuDNN graph-API configs"
fi
exec "$PY" -m engines.build "$@"
