"""What a vectorisation made, as a typed report: the ``vectors.json`` record plus what only memory holds.

Callers pass the report on (the pipeline, workflows, sequences) instead of reading
``vectors.json`` or reopening the layers: the file is for users, the object is for code.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from geoseg.io.mask import MaskSource
from geoseg.records import Record
from geoseg.vector.layers import REPORT_NAME
from geoseg.vector.params import VectorParams
from geoseg.vector.writers import Layer

__all__ = ["VectorReport", "vector_record"]


@dataclass(frozen=True, eq=False)
class VectorReport(Record):
    """The outcome of :func:`geoseg.vector.vectorize`.

    Reads like the ``vectors.json`` record it wrote (``report["layers"]``), and adds what the
    file does not hold.

    Attributes
    ----------
    record : dict
        The contents of ``vectors.json``.
    folder : str
        The output folder (absolute).
    areas_m2 : dict
        Layer name -> total area of its polygons in m² (None for a pixel-space mask).
    """

    record: dict[str, Any]
    folder: str
    areas_m2: dict[str, float | None] = field(default_factory=dict)

    def files(self) -> list[str]:
        """Every file written, relative to :attr:`folder` (``vectors.json`` included)."""
        out = [REPORT_NAME]
        for v in self.record["outputs"].values():
            out += v if isinstance(v, list) else [v]
        return out

    def classes(self) -> dict[str, dict[str, Any]]:
        """Layer name -> ``{"objects": features, "area_ha": hectares rounded to 1 m² (None without a CRS)}``."""
        out = {}
        for layer in self.record["layers"]:
            m2 = self.areas_m2.get(layer["name"])
            out[layer["name"]] = {"objects": layer["features"], "area_ha": None if m2 is None else round(m2 / 10_000, 3)}
        return out

    def coco_document(self) -> dict[str, Any] | None:
        """The COCO document written with the ``coco`` format, else None."""
        import json

        name = self.record["outputs"].get("coco")
        if not name:
            return None
        with open(os.path.join(self.folder, name)) as f:
            return json.load(f)


def vector_record(
    src: MaskSource,
    params: VectorParams,
    out_crs: str | None,
    parameters: dict[str, Any],
    layers: Sequence[Layer],
    counts: dict[str, int],
    written: dict[str, Any],
    run: Any,
    write_s: dict[str, float],
    t_start: float,
) -> dict[str, Any]:
    """The contents of ``vectors.json``: parameters, layers with feature counts, outputs, seam numbers, timings.

    ``run`` is None for a detector's boxes (no mask, no chunks polygonised): ``mask`` is then None.
    """
    gb = src.geobox
    record = {
        "geoseg_vectors": 1,
        "run_id": params.run_id,
        "mask": src.path if run is not None else None,
        "probabilities": src.prob_path,
        "crs": {"mask": gb.crs, "outputs": out_crs, "geojson": "EPSG:4326" if gb.crs else None, "metric": params.metric_crs},
        "parameters": parameters,
        "layers": [_layer_entry(ly, counts[ly.name]) for ly in layers],
        "features": int(sum(counts.values())),
        "outputs": written,
    }
    timings = {f"write_{k}_s": round(v, 3) for k, v in write_s.items()}
    if run is not None:
        record.update(_chunk_entries(run))
        timings = {**record.pop("timings"), **timings}
    record["timings"] = {**timings, "total_s": round(time.perf_counter() - t_start, 3)}
    if run is not None:
        record["values_present"] = run.present
    return record


def _chunk_entries(run: Any) -> dict[str, Any]:
    """What the chunk tasks and the seam merge of a mask's vectorisation report."""
    results = run.results
    return {
        "chunks": len(results),
        "seam_pieces": run.seam_pieces,
        "seam_objects": run.seam_objects,
        "timings": {
            "chunks_wall_s": round(run.chunks_wall_s, 3),
            "read_task_s": round(sum(r["read_s"] for r in results), 3),
            "polygonize_task_s": round(sum(r["polygonize_s"] for r in results), 3),
            "attributes_task_s": round(sum(r["finish_s"] for r in results), 3),
            "merge_s": round(run.merge_s, 3),
        },
    }


def _layer_entry(ly: Layer, features: int) -> dict[str, Any]:
    """A layer in ``vectors.json``: its class, or (a value layer) its value field and the values it holds."""
    which = {"field": ly.field, "values": list(ly.values)} if ly.field else {"class_id": ly.class_id}
    return {"name": ly.name, **which, "kind": ly.kind, "color": list(ly.color), "features": features}
