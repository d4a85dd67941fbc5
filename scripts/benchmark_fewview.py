#!/usr/bin/env python
"""Few-view benchmark: coco-inr vs volsdf at 3 and 8 training views on the generated scene.

Trains each method x view count with ns-train, evaluates held-out PSNR/SSIM/masked PSNR (as ns-eval does),
extracts world-unit meshes (cocoinr-extract-mesh) and scores them against the scene's gt_mesh.ply; writes
results.md (table with device and settings), results.json and fewview.png into --output-dir.

    python scripts/benchmark_fewview.py --device cuda --steps 2000 --output-dir outputs/fewview
    python scripts/benchmark_fewview.py --tiny --random-codebook --device cpu --output-dir /tmp/fewview

The logic lives in cocoinr_nerfstudio.benchmarks.fewview (importable and tested).
"""

import sys

from cocoinr_nerfstudio.benchmarks.fewview import main

if __name__ == "__main__":
    sys.exit(main())
