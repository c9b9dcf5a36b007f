"""Vector writers: stream features from parquet parts into GeoJSON, GeoPackage, FlatGeobuf, GeoParquet.

Features are never gathered in one table: each layer is an Arrow record-batch stream read
from the per-chunk parts, reprojected batch by batch, and handed to GDAL (via
``pyogrio.write_arrow``) or to a Parquet writer. Every file is written under a temporary
name by the caller and renamed into place when complete.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import shapely

from geoseg.errors import OutputError
from geoseg.io.outdir import disk_full_error, disk_full_now, disk_full_reason
from geoseg.vector.geometry import reproject

__all__ = [
    "FORMATS",
    "GPKG_VERSION",
    "KIND_COLUMNS",
    "PIXEL_SPACE_MEMBER",
    "VALUE_COLUMNS",
    "Layer",
    "layer_batches",
    "write_layer",
]

FORMATS = ("geojson", "gpkg", "fgb", "parquet")
EXTENSIONS = {"geojson": ".geojson", "gpkg": ".gpkg", "fgb": ".fgb", "parquet": ".parquet"}
_DRIVERS = {"geojson": "GeoJSON", "gpkg": "GPKG", "fgb": "FlatGeobuf"}
#: GeoPackage version written: GDAL 3.6 / QGIS 3.22 read 1.3 without a "may only be partially
#: supported" warning on every open (GDAL >= 3.7 writes 1.4 by default)
GPKG_VERSION = "1.3"
#: Top-level member of a pixel-space GeoJSON (a plain image): its coordinates are not lon/lat.
PIXEL_SPACE_MEMBER = {
    "geoseg:coordinate_space": "pixel",
    "geoseg:coordinates": "x = column, y = row, in pixels from the top-left corner of the image (y down); no CRS",
}

#: columns every layer has, then the extra columns per kind of class
BASE_COLUMNS = ("id", "class", "class_id", "run_id", "area_px", "area_m2", "perimeter_m", "score")
#: a value layer's columns after ``id`` and its value field (no class names or scores: the values are the data)
VALUE_COLUMNS = ("run_id", "area_px", "area_m2", "perimeter_m")
KIND_COLUMNS = {
    "area": ("area_ha",),
    "tank": ("diameter_m", "circularity", "center_lon", "center_lat"),
    "ship": ("length_m", "width_m", "heading_deg"),
    "object": ("length_m", "width_m", "heading_deg"),
    "building": (),
}


@dataclass(frozen=True)
class Layer:
    """One output layer: the features of one class, or (a value layer) of several pixel values with the value in ``field``."""

    name: str
    class_id: int
    kind: str
    color: tuple[int, int, int]
    attributes: tuple[str, ...] = ()  # constant text columns (e.g. date_before, date_after)
    field: str | None = None  # a value layer (``vectorize --field``): the pixel value's column
    values: tuple[int, ...] = ()  # the pixel values a value layer holds

    @property
    def ids(self) -> tuple[int, ...]:
        """The mask values whose features this layer holds."""
        return self.values if self.field else (self.class_id,)

    @property
    def columns(self) -> tuple[str, ...]:
        """Attribute columns of this layer, in order."""
        base = ("id", self.field, *VALUE_COLUMNS) if self.field else BASE_COLUMNS
        return base + KIND_COLUMNS.get(self.kind, ()) + self.attributes

    def read_columns(self) -> list[str]:
        """The parquet parts' columns this layer reads (a value layer's field is the parts' ``class_id``)."""
        return [("class_id" if c == self.field else c) for c in self.columns]


def layer_batches(
    parts: Sequence[str],
    layer: Layer,
    *,
    src_crs: str | None,
    dst_crs: str | None,
    densify: float | None,
    precision: int | None = None,
) -> Iterator:
    """Record batches of one layer from the parquet parts, reprojected to ``dst_crs``.

    Parameters
    ----------
    parts : sequence of str
        Parquet files with the features of every class (WKB ``geometry`` in ``src_crs``).
    layer : Layer
        Which class to stream and which columns to keep.
    src_crs, dst_crs : str or None
        CRS of the parts and of the output (None: pixel space, no reprojection).
    densify : float, optional
        Longest edge in ``src_crs`` units before reprojection.
    precision : int, optional
        Round coordinates to this many decimals (after reprojection), repairing any
        polygon that the rounding made invalid.

    Yields
    ------
    pyarrow.RecordBatch
    """
    import pyarrow.parquet as pq

    if not layer.ids:
        return
    cols = [*layer.read_columns(), "geometry"]
    for path in parts:
        table = pq.read_table(path, columns=cols, filters=[("class_id", "in", list(layer.ids))])
        if table.num_rows == 0:
            continue
        table = table.rename_columns([*layer.columns, "geometry"])
        geoms = shapely.from_wkb(table.column("geometry").to_numpy(zero_copy_only=False))
        if src_crs and dst_crs:
            geoms = reproject(geoms, src_crs, dst_crs, densify=densify)
        if precision is not None:
            # round every vertex (fast), then repair only the few polygons rounding made invalid
            rounded = shapely.set_precision(geoms, 10.0**-precision, mode="pointwise")
            bad = ~shapely.is_valid(rounded)
            if bad.any():
                rounded[bad] = shapely.set_precision(geoms[bad], 10.0**-precision, mode="valid_output")
            geoms = rounded
        geoms = shapely.orient_polygons(geoms)
        table = table.set_column(table.schema.get_field_index("geometry"), "geometry", _wkb_array(geoms))
        yield from table.to_batches()


def _wkb_array(geoms: np.ndarray):
    import pyarrow as pa

    return pa.array(shapely.to_wkb(geoms), type=pa.binary())


def schema(layer: Layer):
    """Arrow schema of a layer's record batches."""
    import pyarrow as pa

    types = {
        "id": pa.int64(),
        "class": pa.string(),
        "class_id": pa.int16(),
        "run_id": pa.string(),
        "area_px": pa.int64(),
    }
    types.update({c: pa.string() for c in layer.attributes})
    if layer.field:
        types[layer.field] = pa.int16()
    return pa.schema([(c, types.get(c, pa.float64())) for c in layer.columns] + [("geometry", pa.binary())])


def write_layer(
    fmt: str,
    path: str,
    layer: Layer,
    batches: Iterator,
    *,
    crs: str | None,
    geometry_type: str,
    precision: int = 7,
) -> None:
    """Write one layer from a record-batch stream.

    Parameters
    ----------
    fmt : str
        ``geojson`` (RFC 7946: lon/lat, counter-clockwise exteriors, no ``crs`` member),
        ``gpkg`` (adds the layer to ``path``, with a spatial index), ``fgb`` (indexed
        FlatGeobuf) or ``parquet`` (GeoParquet 1.1, WKB).
    path : str
        File to write (a temporary name; the caller renames it).
    layer : Layer
        The layer.
    batches : iterator of pyarrow.RecordBatch
        From :func:`layer_batches`.
    crs : str or None
        CRS of the geometries.
    geometry_type : str
        ``Polygon`` or ``MultiPolygon``.
    precision : int
        GeoJSON coordinate decimals.
    """
    import pyarrow as pa

    reader = pa.RecordBatchReader.from_batches(schema(layer), batches)
    try:
        if fmt == "parquet":
            _write_geoparquet(path, reader, crs, geometry_type)
            return
        import pyogrio

        options: dict[str, object] = {}
        dataset: dict[str, object] = {}
        if fmt == "geojson" and crs:
            options = {"RFC7946": "YES", "COORDINATE_PRECISION": precision, "WRITE_NAME": "NO"}
        elif fmt == "geojson":  # pixel space: plain GeoJSON, no CRS, and the file says so
            options = {"WRITE_NAME": "NO", "FOREIGN_MEMBERS_COLLECTION": json.dumps(PIXEL_SPACE_MEMBER)}
        elif fmt == "gpkg":
            options = {"SPATIAL_INDEX": "YES", "GEOMETRY_NAME": "geom"}
            dataset = {"VERSION": GPKG_VERSION}
        elif fmt == "fgb":
            options = {"SPATIAL_INDEX": "YES"}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="'crs' was not provided")  # pixel space, on purpose
            pyogrio.write_arrow(
                reader,
                path,
                layer=layer.name,
                driver=_DRIVERS[fmt],
                geometry_name="geometry",
                geometry_type=geometry_type,
                crs=crs,
                layer_options=options,
                dataset_options=dataset,
            )
    except Exception as exc:  # GDAL errors surface as pyogrio's own exception types ("Cannot write feature")
        if not isinstance(exc, OSError) and not type(exc).__module__.startswith(("pyogrio", "pyarrow")):
            raise

        reason = disk_full_reason(exc) or disk_full_now(path, path)
        if reason:
            raise disk_full_error(path, reason) from exc
        text = " ".join(str(exc).split())[:300]
        raise OutputError(f"{path}: could not write the {fmt} layer {layer.name!r} ({text}); check disk space") from exc


def _write_geoparquet(path: str, reader, crs: str | None, geometry_type: str) -> None:
    import pyarrow.parquet as pq

    column: dict[str, object] = {"encoding": "WKB", "geometry_types": [geometry_type]}
    if crs:
        from pyproj import CRS

        column["crs"] = CRS.from_user_input(crs).to_json_dict()
    else:
        column["crs"] = None
    geo = {"version": "1.1.0", "primary_column": "geometry", "columns": {"geometry": column}}
    sch = reader.schema.with_metadata({b"geo": json.dumps(geo).encode()})
    with pq.ParquetWriter(path, sch, compression="zstd") as w:
        for batch in reader:
            w.write_batch(batch)
