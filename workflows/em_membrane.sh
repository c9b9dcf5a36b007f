#!/usr/bin/env bash
# Cell membranes in electron microscopy (ISBI 2012): train a small U-Net on one slice, segment another, score Dice.
#
#   bash workflows/em_membrane.sh [DATA_DIR] [OUT_DIR]
#
# DATA_DIR holds train_0.png, train_0_label.png, train_1.png, train_1_label.png (512x512 greyscale EM, labels
# 255 = cell interior, 0 = membrane; default ../shared/data/plain/isbi2012_em_membrane beside the repository);
# OUT_DIR (default em_out) gets the model, the mask of train_1 and the scores. Plain PNGs have no CRS: geoseg
# works in pixel coordinates (each command warns once). The card is workflows/em_membrane.card.yaml (class 0 = cell,
# class 1 = membrane, the ISBI target). Runs on CPU in a few minutes; THREADS (default 2) sets torch's threads.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
data="${1:-$repo/../shared/data/plain/isbi2012_em_membrane}"
out="${2:-em_out}"
threads="${THREADS:-2}"
# OpenMP workers sleep instead of spinning at barriers: on cores shared with other work, spinning two-thread
# teams made each training step several times slower
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"

command -v geoseg >/dev/null || { echo "em_membrane.sh: geoseg is not on PATH; activate its environment first" >&2; exit 1; }
for f in train_0.png train_0_label.png train_1.png train_1_label.png; do
    [ -f "$data/$f" ] || { echo "em_membrane.sh: $data/$f not found; give the ISBI 2012 folder as DATA_DIR" >&2; exit 1; }
done
mkdir -p "$out"
values="0=membrane,255=cell"

start=$(date +%s)
# train_1 is the held-out slice, so all of train_0 trains (--val-fraction 0: the epoch kept is the best on
# train_0's own chips); 600 steps of 8 chips of 128 px, flips/rotations and brightness/contrast augmentation
geoseg train --images "$data/train_0.png" --labels "$data/train_0_label.png" --label-values "$values" \
    --card "$here/em_membrane.card.yaml" --out "$out/em_membrane.onnx" --device cpu --threads "$threads" \
    --epochs 20 --steps 30 --batch 8 --chip 128 --val-fraction 0 --seed 0
trained=$(date +%s)
geoseg predict "$data/train_1.png" --model "$out/em_membrane.onnx" --out "$out/train_1" --device cpu \
    --threads "$threads" --scheduler threads --overwrite
geoseg evaluate "$out/train_1/mask.tif" --labels "$data/train_1_label.png" --label-values "$values" \
    --json "$out/train_1_scores.json"

python - "$out/train_1_scores.json" "$((trained - start))" "$(($(date +%s) - start))" <<'EOF'
import json
import sys

scores = json.load(open(sys.argv[1]))["classes"]
dice = ", ".join(f"{name} {row['f1']:.3f}" for name, row in scores.items())
print(f"Dice on train_1 (pixel F1): {dice}  [training {sys.argv[2]} s, all {sys.argv[3]} s]")
EOF
