#!/usr/bin/env bash
# Edge deployment: train and export with the full install, run the model where only numpy and
# onnxruntime are installed (`pip install .` without extras: no torch, no onnx).
#
#   examples/edge_deploy.sh [--data digits|cifar10:DIR] [--bits 2|4] [--min-agreement F]
#                           [--no-oldest] [WORKDIR]
#
# 1. Full install (.venv, `make demo` creates it): a float teacher (digits: trained here in
#    seconds; CIFAR-10: the shipped ResNet20), a ternary (or 4-bit) student distilled from it,
#    exported as packed ONNX and verified against PyTorch.
# 2. Edge install (.venv-edge): the core package alone, checked to have neither torch nor onnx.
# 3. The edge install evaluates and benchmarks the .onnx, converts it to onnxruntime's .ort
#    format and evaluates that too, from the command line and from Python; the script fails
#    unless all three accuracies equal the full install's.
# 4. The oldest onnxruntime pyproject admits replaces the edge install's and runs the .onnx
#    again, with the same accuracy (--no-oldest skips it).
# tests/edge_install.sh (CI) runs this script on digits.
set -euo pipefail
DATA=digits BITS=2 MIN_AGREEMENT=0.999 WORK="" OLDEST=1
while [ $# -gt 0 ]; do
    case "$1" in
        --data) DATA="$2"; shift 2 ;;
        --bits) BITS="$2"; shift 2 ;;
        --min-agreement) MIN_AGREEMENT="$2"; shift 2 ;;
        --no-oldest) OLDEST=0; shift ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) WORK="$1"; shift ;;
    esac
done
cd "$(dirname "$0")/.."
SRC="$PWD"
FULL=.venv/bin
EDGE=.venv-edge
WORK="${WORK:-$(mktemp -d)}"
mkdir -p "$WORK"

# 1. Full install: teacher -> distilled student -> verified packed ONNX.
if [ "$DATA" = digits ]; then
    "$FULL/lowbit" train --arch digits_cnn --width 8 --data digits --epochs 3 --batch-size 64 \
        --lr 0.05 -o "$WORK/teacher.pt"
    TEACHER="$WORK/teacher.pt"
    BUDGET=(--epochs 2 --batch-size 64)
    # The edge install has no scikit-learn: it reads the test split from an .npz file.
    "$FULL/python" -c "import sys, numpy as np; from lowbit import data; \
t = data.digits(train=False); np.savez(sys.argv[1], images=t.images, labels=t.labels)" \
        "$WORK/digits_test.npz"
    TEST="$WORK/digits_test.npz"
else
    TEACHER=$("$FULL/python" -c "from lowbit import models; print(models.pretrained('resnet20_cifar10'))")
    BUDGET=(--epochs 1 --limit 2000 --precision bf16)
    TEST="${DATA%%:*}:$(realpath "${DATA#*:}")"  # the edge runtime reads CIFAR itself
fi
"$FULL/lowbit" distill --teacher "$TEACHER" --data "$DATA" --bits "$BITS/4" \
    --scheme C --temperature 4 "${BUDGET[@]}" -o "$WORK/student.pt"
"$FULL/lowbit-export" "$WORK/student.pt" --format onnx --data "$DATA" \
    --min-agreement "$MIN_AGREEMENT" -o "$WORK/model.onnx"
FULL_ACC=$("$FULL/lowbit" run "$WORK/model.onnx" --data "$TEST" --threads 1)

# 2. Edge install: the core package only, pinned like the full install.
[ -x "$EDGE/bin/python" ] || python3 -m venv "$EDGE"
"$EDGE/bin/python" -m pip install -q -c constraints.txt .
for module in torch onnx; do
    if "$EDGE/bin/python" -c "import $module" 2>/dev/null; then
        echo "edge install: $module is importable; expected the core install without it" >&2
        exit 1
    fi
done

# 3. On the edge: only model.onnx (or model.ort) and the test images are needed.
EDGE_BIN="$PWD/$EDGE/bin"
cd "$WORK"  # away from the source tree: the installed package is what runs
EDGE_ACC=$("$EDGE_BIN/lowbit" run model.onnx --data "$TEST" --threads 1)
"$EDGE_BIN/lowbit" bench model.onnx --batch-size 1 8 --repeat 5 --min-time 0.1
"$EDGE_BIN/lowbit" convert-ort model.onnx -o model.ort
ORT_ACC=$("$EDGE_BIN/lowbit" run model.ort --data "$TEST" --threads 1)
"$EDGE_BIN/python" - "$TEST" <<'PY'
import sys

from lowbit.runtime import Session

session = Session("model.onnx", threads=1)
print(f"python API: accuracy {session.evaluate(sys.argv[1]):.2%}, classes {session.classes}")
assert "torch" not in sys.modules
PY
# 4. The oldest admitted onnxruntime (pyproject's floor) on the same file.
OLD_ACC="$EDGE_ACC"
if [ "$OLDEST" = 1 ]; then
    FLOOR=$(sed -n 's/.*"onnxruntime>=\([0-9.]*\)".*/\1/p' "$SRC/pyproject.toml" | head -1)
    "$EDGE_BIN/python" -m pip install -q "onnxruntime==$FLOOR"
    OLD_ACC=$("$EDGE_BIN/lowbit" run model.onnx --data "$TEST" --threads 1)
    "$EDGE_BIN/python" -m pip install -q --upgrade -c "$SRC/constraints.txt" onnxruntime
fi
echo "full install: $FULL_ACC"
echo "edge install: $EDGE_ACC"
echo "edge (.ort):  $ORT_ACC"
echo "oldest onnxruntime ${FLOOR:-(skipped)}: $OLD_ACC"
[ "${FULL_ACC#*accuracy}" = "${EDGE_ACC#*accuracy}" ] \
    && [ "${EDGE_ACC#*accuracy}" = "${ORT_ACC#*accuracy}" ] \
    && [ "${EDGE_ACC#*accuracy}" = "${OLD_ACC#*accuracy}" ] \
    || { echo "edge-install accuracy differs from the full install" >&2; exit 1; }
echo "edge install OK: no torch, same accuracy ($WORK/model.onnx)"
