#!/usr/bin/env bash
# A colour fundus photograph tiled end to end, in pixel coordinates (no georeference).
#   bash workflows/fundus.sh [IMAGE] [OUT]
# Runs the bundled `vessels` model (a physics rule: haemoglobin absorbs green light) in
# 256 px tiles with a 16 px halo on 512 px Dask chunks, then once on the whole image as one
# tile, and checks the two masks are identical pixel for pixel (the seamless-tiling promise on a
# real photograph). Outputs: OUT/tiled/{mask.tif,mask.png,coco.json,vectors/...}, OUT/whole/.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
image="${1:-$here/../shared/data/plain/retina/retina.jpg}"
out="${2:-fundus_out}"
geoseg predict "$image" -m vessels -o "$out/tiled" --tile 256 --halo 16 --chunk 512 --vectorize --overwrite
side=$(python -c "import sys, rasterio; d = rasterio.open(sys.argv[1]); print(max(d.width, d.height))" "$out/tiled/mask.tif")
geoseg predict "$image" -m vessels -o "$out/whole" --tile "$((side + 32))" --halo 16 --chunk "$side" --scheduler synchronous --overwrite
python - "$out" <<'PY'
import sys

import numpy as np
import rasterio

out = sys.argv[1]
tiled = rasterio.open(f"{out}/tiled/mask.tif").read(1)
whole = rasterio.open(f"{out}/whole/mask.tif").read(1)
same = bool((tiled == whole).all())
print(f"{tiled.shape[1]}x{tiled.shape[0]} px; vessel share {np.mean(tiled == 1):.3f}; tiled == whole image: {same}")
sys.exit(0 if same else 1)
PY
