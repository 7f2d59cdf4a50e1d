#!/usr/bin/env bash
# Edge-install proof: a separate venv with only the core install of lowbit (numpy +
# onnxruntime, no torch) loads, runs, evaluates and benchmarks a model that the full install
# (.venv, with the [train] extra) trained and exported, with the same accuracy as .onnx and
# .ort. The steps and checks are examples/edge_deploy.sh on the offline digits.
#   usage: tests/edge_install.sh [WORKDIR]     (CI: the lead wires it into .ci/run)
#
# EDGE_BITS=4 exports a 4-bit student instead of a ternary one. The export gate is lowered to
# 95% here: this proof is about the runtime (the example checks that the edge install
# reproduces the full install's onnxruntime accuracy exactly). On 359 test images the default
# 99.9% allows no image to flip, and a 2-epoch digits student still has ~1% near-tied images
# whose class onnxruntime's int32 bias rounding can change.
set -euo pipefail
cd "$(dirname "$0")/.."
exec examples/edge_deploy.sh --data digits --bits "${EDGE_BITS:-2}" --min-agreement 0.95 "$@"
