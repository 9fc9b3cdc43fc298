"""Fails the image's build when pip installed a torch built for another CUDA major
version than the base image's (its CUDA_VERSION).

Why: `torch==2.14.1` is met by PyPI's own build too, so when the index in
TORCH_INDEX_URL has no build of that version for the base's CUDA, pip takes PyPI's
without a word. That one is built for CUDA 13, which needs an NVIDIA driver 580 or
newer; on a T4 node with an older driver the pod would start and find no GPU.
"""

from __future__ import annotations

import os
import sys

import torch

base = os.environ.get("CUDA_VERSION", "")
built = torch.version.cuda or ""
if not base or base.split(".")[0] != built.split(".")[0]:
    sys.exit(
        f"torch {torch.__version__} is built for CUDA {built or 'none (CPU only)'}, the "
        f"base image has CUDA {base or 'unknown (no CUDA_VERSION)'}: set TORCH_INDEX_URL "
        "to an index with this torch version built for the base's CUDA, or change the "
        "base image to match"
    )
print(f"torch {torch.__version__}: CUDA {built}, as the base image ({base})")
