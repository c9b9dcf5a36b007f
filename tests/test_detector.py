"""Detector models (YOLO layouts with Deepness/GeoDeep metadata) and the thresholds of binary segmentors.

The detectors are ONNX graphs built here: a box wherever a uniform bright square of ``S`` pixels
(band 1: class ``car``, band 2: class ``tree``) lies whole in the tile, scored by its brightness,
in the zoos' output layouts (YOLOv5 rows, Ultralytics columns, Ultralytics OBB).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
from rasterio.transform import from_origin

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

import geoseg  # noqa: E402
from geoseg.errors import InputError  # noqa: E402
from geoseg.models.detector import Boxes, nms, settle  # noqa: E402
from geoseg.models.spec import resolve_model  # noqa: E402

T, S = 64, 9  # the detectors' fixed tile, the squares' side
ORIGIN = (500000.0, 4100000.0)
RES = 0.5


def _const(name: str, array: np.ndarray):
    return helper.make_tensor(name, TensorProto.FLOAT, array.shape, array.astype(np.float32).ravel().tolist())


def _square_scores(nodes: list, inits: list) -> str:
    """Nodes giving ``P`` (1, 2, T, T): at a square's centre pixel its brightness (bands 1, 2), else 0."""
    h = S // 2
    inits += [helper.make_tensor(n, TensorProto.INT64, [len(v)], v) for n, v in (("s0", [0]), ("s2", [2]), ("ax", [1]))]
    inits.append(helper.make_tensor("pads", TensorProto.INT64, [8], [0, 0, h, h, 0, 0, h, h]))
    inits.append(_const("zero", np.zeros(())))
    nodes += [
        helper.make_node("Slice", ["x", "s0", "s2", "ax"], ["xb"]),
        helper.make_node("MaxPool", ["xb"], ["mx"], kernel_shape=[S, S]),
        helper.make_node("Neg", ["xb"], ["nxb"]),
        helper.make_node("MaxPool", ["nxb"], ["nmn"], kernel_shape=[S, S]),
        helper.make_node("Neg", ["nmn"], ["mn"]),
        helper.make_node("Equal", ["mx", "mn"], ["uni_b"]),  # the whole window one value: a square, whole
        helper.make_node("Cast", ["uni_b"], ["uni"], to=TensorProto.FLOAT),
        helper.make_node("Greater", ["mn", "zero"], ["lit_b"]),
        helper.make_node("Cast", ["lit_b"], ["lit"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["uni", "lit"], ["hit"]),
        helper.make_node("Mul", ["hit", "mn"], ["valid_scores"]),
        helper.make_node("Pad", ["valid_scores", "pads"], ["P"]),
    ]
    return "P"


def detector_onnx(path: Path, layout: str, meta: dict, angle: float = 0.0) -> Path:
    """A square detector in ``layout`` (``yolov5``, ``ultralytics`` or ``ultralytics_obb``) with ``meta``."""
    nodes: list = []
    inits: list = []
    p = _square_scores(nodes, inits)
    rows, cols = np.mgrid[0:T, 0:T].astype(np.float32)
    inits += [
        _const("cx", (cols + 0.5)[None, None]),
        _const("cy", (rows + 0.5)[None, None]),
        _const("wh", np.full((1, 1, T, T), float(S))),
        helper.make_tensor("shape", TensorProto.INT64, [3], [1, -1, T * T]),
    ]
    if layout == "yolov5":
        nodes.append(helper.make_node("ReduceMax", [p], ["obj"], axes=[1], keepdims=1))
        nodes.append(helper.make_node("Greater", [p, "zero"], ["cls_b"]))
        nodes.append(helper.make_node("Cast", ["cls_b"], ["cls"], to=TensorProto.FLOAT))
        parts = ["cx", "cy", "wh", "wh", "obj", "cls"]
    else:
        parts = ["cx", "cy", "wh", "wh", p]
    if layout == "ultralytics_obb":
        inits.append(_const("angle", np.full((1, 1, T, T), angle)))
        parts.append("angle")
    nodes.append(helper.make_node("Concat", parts, ["cat"], axis=1))
    nodes.append(helper.make_node("Reshape", ["cat", "shape"], ["flat"]))
    width = {"yolov5": 7, "ultralytics": 6, "ultralytics_obb": 7}[layout]
    if layout == "yolov5":
        nodes.append(helper.make_node("Transpose", ["flat"], ["out"], perm=[0, 2, 1]))
        out_shape = [1, T * T, width]
    else:
        nodes.append(helper.make_node("Identity", ["flat"], ["out"]))
        out_shape = [1, width, T * T]
    graph = helper.make_graph(
        nodes,
        "squares",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, T, T])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, out_shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    for key, value in meta.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=json.dumps(value)))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


DET_META = {
    "model_type": "Detector",
    "class_names": {"0": "car", "1": "tree"},
    "tiles_size": T,
    "tiles_overlap": 50,  # halo 16: squares of 9 px are seen whole by every tile that sees them
    "det_conf": 0.3,
    "det_iou_thresh": 0.5,
}

#: squares (row, col, band, value): one straddling the chunk seam at 64 (and the tile cores' seams at 64),
#: one on the seam at 128 both ways, one faint (value 50: score 0.196 < det_conf 0.3), one of class tree
SQUARES = [(20, 60, 0, 255), (124, 124, 0, 200), (150, 30, 0, 50), (40, 170, 1, 255), (100, 100, 1, 128)]


def scene(path: Path, squares=SQUARES, height: int = 200, width: int = 230, side: int = S, res: float = RES) -> Path:
    data = np.zeros((3, height, width), np.uint8)
    data[2] = 90  # a band the detectors ignore
    for r, c, band, value in squares:
        data[band, r : r + side, c : c + side] = value
    profile = {"driver": "GTiff", "width": width, "height": height, "count": 3, "dtype": "uint8"}
    profile.update(crs="EPSG:32633", transform=from_origin(*ORIGIN, res, res))
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def expected_box(r: int, c: int) -> shapely.Polygon:
    """The square's footprint in map coordinates."""
    x0, y0 = ORIGIN[0] + c * RES, ORIGIN[1] - r * RES
    return shapely.box(x0, y0 - S * RES, x0 + S * RES, y0)


@pytest.fixture
def synchronous():
    import dask

    with dask.config.set(scheduler="synchronous"):
        yield


def _boxes_key(found) -> list:
    b = found.boxes
    return sorted(zip(shapely.to_wkt(b.geometry, rounding_precision=9), b.score.round(9), b.class_id.tolist(), strict=True))


@pytest.mark.parametrize("layout,det_type", [("yolov5", "YOLO_v5_or_v7_default"), ("ultralytics", "YOLO_Ultralytics")])
def test_boxes_land_on_the_map_once_across_seams(tmp_path, synchronous, layout, det_type) -> None:
    from geoseg.engine.detect import detect

    model = detector_onnx(tmp_path / "det.onnx", layout, {**DET_META, "det_type": det_type})
    card = resolve_model(str(model)).card
    assert card.detector.layout == layout and card.detector.conf == 0.3 and card.task == "objects"
    assert [c.name for c in card.classes] == ["car", "tree"] and card.tile == T and card.halo == 16
    src = scene(tmp_path / "scene.tif")
    whole = detect(str(src), str(model), chunk=4096)  # one chunk: every tile, then one NMS over all their boxes
    chunked = detect(str(src), str(model), chunk=64)  # 4 x 4 chunks, squares on their seams
    assert chunked.job.plan.shape == (4, 4) and whole.job.plan.shape == (1, 1)
    assert _boxes_key(chunked) == _boxes_key(whole)  # exact, whatever the chunking
    assert chunked.seam_boxes > 0  # the seams were exercised
    # one box per square over the conf, in pixel coordinates of the raster, scored by brightness
    b = chunked.boxes
    want = sorted((c, r, c + S, r + S, v / 255, band) for r, c, band, v in SQUARES if v / 255 >= 0.3)
    rows = zip(b.geometry, b.score, b.class_id, strict=True)
    got = sorted((*np.round(shapely.bounds(g), 6), round(float(s), 6), int(k)) for g, s, k in rows)
    assert got == [(*w[:4], round(w[4], 6), w[5]) for w in want]
    assert chunked.counts() == {"car": 2, "tree": 2}


def test_layers_run_json_and_conf(tmp_path, synchronous) -> None:
    import pyogrio

    model = detector_onnx(tmp_path / "det.onnx", "yolov5", {**DET_META, "det_type": "YOLO_v5_or_v7_default"})
    src = scene(tmp_path / "scene.tif")
    out = tmp_path / "out"
    done = geoseg.segment(str(src), str(model), out, chunk=64)
    assert done.mask is None and not (out / "mask.tif").exists()
    run = json.loads((out / "run.json").read_text())
    assert run["detections"]["classes"] == {"car": 2, "tree": 2} and run["detections"]["mask"].startswith("none")
    assert run["parameters"]["conf"] == 0.3 and run["parameters"]["iou"] == 0.5 and run["parameters"]["layout"] == "yolov5"
    cars = pyogrio.read_dataframe(out / "geoseg.gpkg", layer="car")
    assert len(cars) == 2 and cars.crs.to_epsg() == 32633
    for r, c, band, v in SQUARES:
        if band == 0 and v / 255 >= 0.3:
            hit = cars[cars.geometry.intersects(expected_box(r, c).centroid)]
            assert len(hit) == 1 and hit.geometry.iloc[0].normalize().equals_exact(expected_box(r, c).normalize(), 1e-6)
            assert hit["score"].iloc[0] == pytest.approx(v / 255, abs=1e-6)
            assert hit["area_m2"].iloc[0] == pytest.approx((S * RES) ** 2, rel=1e-3)
            assert hit["length_m"].iloc[0] == pytest.approx(S * RES, rel=1e-3)  # an object's oriented box
    assert set(cars["class"]) == {"car"}
    gj = json.loads((out / "vectors" / "tree.geojson").read_text())  # RFC 7946: lon/lat
    assert len(gj["features"]) == 2 and abs(gj["features"][0]["geometry"]["coordinates"][0][0][0]) < 180
    assert (out / "project.qgz").exists() and json.loads((out / "vectors.json").read_text())["mask"] is None
    # --conf / conf= overrides the metadata's det_conf: the faint square comes in
    low = geoseg.segment(str(src), str(model), tmp_path / "low", chunk=64, conf=0.1)
    assert low.run["detections"]["classes"] == {"car": 3, "tree": 2} and low.run["parameters"]["conf"] == 0.1
    high = geoseg.segment(str(src), str(model), tmp_path / "high", chunk=64, conf=0.9)
    assert high.run["detections"]["classes"] == {"car": 1, "tree": 1}
    # a segmentation run's mask in the folder does not outlive a detector's run over it
    seg = geoseg.segment(str(src), str(segmentor_onnx(tmp_path / "seg.onnx", 1, {})), tmp_path / "high", overwrite=True)
    assert (tmp_path / "high" / "mask.tif").exists()
    geoseg.segment(str(src), str(model), tmp_path / "high", chunk=64, overwrite=True)
    assert not (tmp_path / "high" / "mask.tif").exists() and seg.mask is not None


def test_oriented_boxes(tmp_path, synchronous) -> None:
    from geoseg.engine.detect import detect

    angle = 0.4
    meta = {**DET_META, "det_type": "YOLO_Ultralytics_obb"}
    model = detector_onnx(tmp_path / "obb.onnx", "ultralytics_obb", meta, angle=angle)
    src = scene(tmp_path / "scene.tif", squares=[(60, 60, 0, 255), (120, 150, 1, 200)])
    found = detect(str(src), str(model), chunk=64)
    assert len(found.boxes) == 2
    for g, (r, c) in zip(found.boxes.geometry[np.argsort(found.boxes.class_id)], [(60, 60), (120, 150)], strict=True):
        assert g.area == pytest.approx(S * S, rel=1e-6)  # whole rotated squares, turned by the model's angle
        edge = np.diff(shapely.get_coordinates(g)[:2], axis=0)[0]
        assert np.arctan2(edge[1], edge[0]) % (np.pi / 2) == pytest.approx(angle)
        assert g.centroid.x == pytest.approx(c + S / 2) and g.centroid.y == pytest.approx(r + S / 2)
    assert _boxes_key(found) == _boxes_key(detect(str(src), str(model), chunk=4096))


def test_resampled_tiles_give_boxes_on_the_raster(tmp_path, synchronous) -> None:
    """A detector made for 0.5 m on a 0.25 m raster: tiles shrunk 2x for the model, its boxes grown 2x back."""
    from geoseg.engine.detect import detect

    model = detector_onnx(tmp_path / "det.onnx", "yolov5", {**DET_META, "det_type": "YOLO_v5_or_v7_default", "resolution": 50})
    squares = [(40, 60, 0, 255), (150, 120, 1, 255)]  # 18 px squares at even offsets: 9 px, whole, for the model
    src = scene(tmp_path / "fine.tif", squares=squares, height=260, width=300, side=2 * S, res=RES / 2)
    found = detect(str(src), str(model), chunk=128)
    assert found.job.runtime.scale == pytest.approx(0.5, abs=1e-3) and found.job.plan.tile == 2 * T
    got = sorted(tuple(np.round(shapely.bounds(g), 6)) for g in found.boxes.geometry)
    assert got == sorted((c, r, c + 2 * S, r + 2 * S) for r, c, _, _ in squares)


def _random_boxes(rng: np.random.Generator, n: int) -> Boxes:
    x0, y0 = rng.uniform(0, 200, n), rng.uniform(0, 200, n)
    w, h = rng.uniform(3, 12, n), rng.uniform(3, 12, n)
    scores = rng.choice([0.5, 0.6, 0.7, 0.9], n)  # many ties: ranks must still be a total order
    return Boxes(shapely.box(x0, y0, x0 + w, y0 + h), scores, rng.integers(0, 2, n).astype(np.int16))


def _key(bx: Boxes) -> list:
    return sorted(zip(shapely.to_wkb(bx.geometry), bx.score, bx.class_id, strict=True))


def test_settle_is_exact_for_any_split() -> None:
    """Per chunk groups + one NMS over the seam groups == one NMS over every box, on random crowded boxes,
    where suppressing each chunk alone and then all the survivors again is not.
    """
    rng = np.random.default_rng(3)
    margin, iou = 12, 0.2  # chunks whose boxes lie in the chunk grown by a margin (as halos make them)
    naive_wrong = 0
    for trial, step in enumerate([50, 100] * 6):
        reach = {
            (i, j): (j * step - margin, i * step - margin, (j + 1) * step + margin, (i + 1) * step + margin)
            for i in range(200 // step)
            for j in range(200 // step)
        }
        boxes = _random_boxes(rng, 800)
        b = shapely.bounds(boxes.geometry)
        inside = [(r[0] <= b[:, 0]) & (r[1] <= b[:, 1]) & (b[:, 2] <= r[2]) & (b[:, 3] <= r[3]) for r in reach.values()]
        owner = np.argmax(np.stack(inside), axis=0)  # the first chunk whose reach holds the box
        finals, seams = [], []
        for n, key in enumerate(reach):
            final, seam = settle(boxes.take(owner == n), iou, [v for k, v in reach.items() if k != key])
            finals.append(final)
            seams.append(seam)
        merged = Boxes.concat([*finals, nms(Boxes.concat(seams), iou)])
        whole = nms(boxes, iou)
        assert _key(merged) == _key(whole), trial
        naive = nms(Boxes.concat([nms(boxes.take(owner == n), iou) for n in range(len(reach))]), iou)
        naive_wrong += _key(naive) != _key(whole)
    assert naive_wrong  # chains of suppression cross the seams: the test would catch a shortcut


def test_detector_refusals(tmp_path, synchronous) -> None:
    model = detector_onnx(tmp_path / "det.onnx", "yolov5", {**DET_META, "det_type": "YOLO_v5_or_v7_default"})
    src = scene(tmp_path / "scene.tif")
    with pytest.raises(InputError, match="detector gives boxes"):
        geoseg.segment(str(src), str(model), tmp_path / "a", probabilities=True)
    with pytest.raises(InputError, match="give conf= instead"):
        geoseg.segment(str(src), str(model), tmp_path / "b", threshold=0.5)
    wrong = detector_onnx(tmp_path / "wrong.onnx", "yolov5", {**DET_META, "det_type": "YOLO_Ultralytics"})
    with pytest.raises(geoseg.errors.ModelError, match="ultralytics detector's output of shape"):
        geoseg.segment(str(src), str(wrong), tmp_path / "c")
    with pytest.raises(InputError, match="a detector gives boxes, not a mask"):
        geoseg.predict(str(src), str(model))
    from geoseg.engine.detect import detect

    with pytest.raises(InputError, match="not a detector"):
        detect(str(src), str(segmentor_onnx(tmp_path / "seg1.onnx", 1, {})))
    with pytest.raises(InputError, match=r"conf=1.5: give a number in \(0, 1\]"):
        detect(str(src), str(model), conf=1.5)
    with pytest.raises(InputError, match="conf= and iou= are a detector's"):
        geoseg.segment(str(src), str(segmentor_onnx(tmp_path / "seg.onnx", 1, {})), tmp_path / "d", conf=0.5)
    bad = detector_onnx(tmp_path / "bad.onnx", "yolov5", {**DET_META, "det_type": "retinanet"})
    with pytest.raises(geoseg.errors.ModelError, match="det_type 'retinanet'"):
        resolve_model(str(bad))


# ---------------------------------------------------------------- thresholds of binary segmentors


def segmentor_onnx(path: Path, channels: int, meta: dict) -> Path:
    """Band 1 (scaled by the card) as the probability of class 1: one channel ``p``, or two ``[1 - p, p]``."""
    inits = [helper.make_tensor(n, TensorProto.INT64, [1], v) for n, v in (("s0", [0]), ("s1", [1]), ("ax", [1]))] + [
        _const("one", np.ones(()))
    ]
    nodes = [helper.make_node("Slice", ["x", "s0", "s1", "ax"], ["p"])]
    if channels == 2:
        nodes += [helper.make_node("Sub", ["one", "p"], ["q"]), helper.make_node("Concat", ["q", "p"], ["out"], axis=1)]
    else:
        nodes.append(helper.make_node("Identity", ["p"], ["out"]))
    graph = helper.make_graph(
        nodes,
        "band",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", channels, "h", "w"])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    for key, value in meta.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=json.dumps(value)))
    onnx.save(model, str(path))
    return path


def ramp(path: Path) -> tuple[Path, np.ndarray]:
    """Band 1 a ramp 0..255 (the probability p = value / 255)."""
    data = np.zeros((3, 64, 256), np.uint8)
    data[0] = np.arange(256, dtype=np.uint8)[None, :]
    profile = {"driver": "GTiff", "width": 256, "height": 64, "count": 3, "dtype": "uint8"}
    profile.update(crs="EPSG:32633", transform=from_origin(*ORIGIN, RES, RES))
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path, data[0].astype(np.float32) / 255


@pytest.mark.parametrize("channels", [1, 2])
def test_seg_thresh_and_threshold_cut_binary_models(tmp_path, synchronous, channels) -> None:
    meta = {"model_type": "Segmentor", "class_names": {"0": "background", "1": "field"}, "seg_thresh": 0.7}
    model = segmentor_onnx(tmp_path / f"seg{channels}.onnx", channels, meta)
    card = resolve_model(str(model)).card
    assert card.threshold == 0.7 and card.activation == "none"  # Deepness segmentors output probabilities
    src, p = ramp(tmp_path / "ramp.tif")
    done = geoseg.segment(str(src), str(model), tmp_path / "a", tile=64, halo=0)
    with rasterio.open(done.mask) as ds:
        np.testing.assert_array_equal(ds.read(1), (p >= np.float32(0.7)).astype(np.uint8))
    assert done.run["parameters"]["threshold"] == 0.7
    for blend in ("crop", "cosine"):  # --threshold / threshold= overrides the metadata, under both stitchings
        done = geoseg.segment(str(src), str(model), tmp_path / f"b{blend}", tile=64, halo=8, threshold=0.3, blend=blend)
        with rasterio.open(done.mask) as ds:
            np.testing.assert_array_equal(ds.read(1), (p >= np.float32(0.3)).astype(np.uint8))
        assert done.run["parameters"]["threshold"] == 0.3
    done = geoseg.segment(str(src), str(model), tmp_path / "c", tile=64, halo=0, threshold=0.3, probabilities=True)
    with rasterio.open(done.mask) as ds:
        np.testing.assert_array_equal(ds.read(1), (p >= np.float32(0.3)).astype(np.uint8))


def test_threshold_on_logits_and_refusal(tmp_path, synchronous) -> None:
    """A plain binary model (a logit, sigmoid) takes threshold= too; a model of three classes refuses it."""
    src, p = ramp(tmp_path / "ramp.tif")
    logit = segmentor_onnx(tmp_path / "logit.onnx", 1, {})  # no card: raw band values are the logit
    done = geoseg.segment(str(src), str(logit), tmp_path / "a", tile=64, halo=0, threshold=0.9)
    value = p * 255
    with rasterio.open(done.mask) as ds:
        np.testing.assert_array_equal(ds.read(1), (1 / (1 + np.exp(-value)) >= 0.9).astype(np.uint8))
    three = tmp_path / "three.onnx"
    m = onnx.load(str(segmentor_onnx(tmp_path / "two.onnx", 2, {})))
    m.graph.node.append(helper.make_node("Concat", ["out", "p"], ["out3"], axis=1))
    m.graph.output[0].CopyFrom(helper.make_tensor_value_info("out3", TensorProto.FLOAT, ["n", 3, "h", "w"]))
    onnx.save(m, str(three))
    with pytest.raises(InputError, match="threshold= cuts a binary model"):
        geoseg.segment(str(src), str(three), tmp_path / "b", tile=64, halo=0, threshold=0.5)


# ---------------------------------------------------------------- the command line, on the default local cluster


def test_cli_detector_end_to_end(tmp_path) -> None:
    model = detector_onnx(tmp_path / "det.onnx", "ultralytics", {**DET_META, "det_type": "YOLO_Ultralytics"})
    src = scene(tmp_path / "scene.tif")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "geoseg", "predict", str(src), "--model", str(model), "--out", str(out), "--chunk", "64"]
    proc = subprocess.run([*cmd, "--conf", "0.1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "found 5 objects (car 3, tree 2)" in proc.stdout and str(out / "geoseg.gpkg") in proc.stdout
    run = json.loads((out / "run.json").read_text())
    assert run["scheduler"]["kind"] == "local"  # 16 chunks: auto starts the local cluster
    assert run["detections"]["total"] == 5 and run["parameters"]["conf"] == 0.1 and run["tiles"]["total"] > 0
    assert not (out / "mask.tif").exists() and (out / "vectors" / "car.geojson").exists()


def test_card_keys_detector_and_threshold() -> None:
    from geoseg.models.card import card_from_dict, card_to_dict

    card = card_from_dict({"name": "d", "detector": {"layout": "ultralytics", "conf": 0.4}, "threshold": 0.6}, "d.yaml")
    assert card.detector.layout == "ultralytics" and card.detector.conf == 0.4 and card.detector.iou == 0.45
    assert card.task == "objects" and card.threshold == 0.6
    assert card_from_dict(card_to_dict(card), "again") == card
    assert [c.kind for c in card.with_classes(3).classes] == ["object"] * 3  # a detector's classes: no background
    for bad, needle in (
        ({"detector": {"layout": "ssd"}}, "detector needs a layout"),
        ({"detector": {"layout": "yolov5", "conf": 0}}, r"conf must be a number in \(0, 1\]"),
        ({"detector": {"layout": "yolov5", "nms": 1}}, "unknown detector key"),
        ({"threshold": 1.5}, r"threshold must be a number in \(0, 1\]"),
    ):
        with pytest.raises(geoseg.errors.ModelError, match=needle):
            card_from_dict({"name": "d", **bad}, "d.yaml")


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_a_fixed_batch_is_found_by_the_probe_and_kept(tmp_path, monkeypatch, backend) -> None:
    """A zoo's batch-1 export: the probe reads the fixed batch off the model's input (any ONNX model, on either
    runtime), and the plan keeps it, where a GPU's default would give 8; a free batch stays free."""
    import importlib.util

    from geoseg.engine.plan import plan_job
    from geoseg.models.runtime import probe
    from geoseg.models.spec import Runtime

    if backend == "openvino" and importlib.util.find_spec("openvino") is None:
        pytest.skip("OpenVINO is not installed (pip install 'geoseg[fast]')")
    monkeypatch.setenv("GEOSEG_ONNX_BACKEND", backend)
    det = resolve_model(str(detector_onnx(tmp_path / "det.onnx", "yolov5", {**DET_META, "det_type": "YOLO_v5_or_v7_default"})))
    seg = resolve_model(str(segmentor_onnx(tmp_path / "seg.onnx", 1, {})))
    assert probe(det, Runtime(device="cpu"), 3, T).fixed_batch == 1
    assert probe(seg, Runtime(device="cpu"), 3, 64).fixed_batch is None
    assert plan_job(str(scene(tmp_path / "s.tif")), det).runtime.batch_size == 1


def test_aoi_keeps_the_boxes_centred_inside(tmp_path, synchronous) -> None:
    import geopandas as gpd

    from geoseg.engine.detect import detect

    model = detector_onnx(tmp_path / "det.onnx", "yolov5", {**DET_META, "det_type": "YOLO_v5_or_v7_default"})
    src = scene(tmp_path / "scene.tif")
    left = shapely.box(ORIGIN[0], ORIGIN[1] - 200 * RES, ORIGIN[0] + 110 * RES, ORIGIN[1])  # columns 0-110
    gpd.GeoDataFrame(geometry=[left], crs="EPSG:32633").to_file(tmp_path / "aoi.gpkg")
    found = detect(str(src), str(model), chunk=64, aoi=str(tmp_path / "aoi.gpkg"))
    centres = sorted((round(g.centroid.y - S / 2), round(g.centroid.x - S / 2)) for g in found.boxes.geometry)
    assert centres == [(20, 60), (100, 100)] and found.counts() == {"car": 1, "tree": 1}


# ---------------------------------------------------------------- xarray in, STAC out


def test_a_rioxarray_cube_gives_the_boxes_of_its_file(tmp_path, synchronous) -> None:
    """The array's read tasks take its own blocks (chunked unlike geoseg's chunks): the same boxes as the file."""
    import pyogrio
    import rioxarray

    from geoseg.engine.detect import detect

    model = detector_onnx(tmp_path / "det.onnx", "ultralytics", {**DET_META, "det_type": "YOLO_Ultralytics"})
    src = scene(tmp_path / "scene.tif")
    cube = rioxarray.open_rasterio(src, chunks={"band": 3, "y": 37, "x": 53})
    want = detect(str(src), str(model), chunk=64)
    got = detect(cube, str(model), chunk=64)
    assert got.seam_boxes > 0 and _boxes_key(got) == _boxes_key(want)
    done = geoseg.segment(cube, str(model), tmp_path / "cube", chunk=64)
    run = done.run
    assert "path" not in run["input"] and run["detections"]["classes"] == {"car": 2, "tree": 2}
    geoseg.segment(str(src), str(model), tmp_path / "file", chunk=64)
    file_cars = pyogrio.read_dataframe(tmp_path / "file" / "geoseg.gpkg", layer="car")
    cube_cars = pyogrio.read_dataframe(tmp_path / "cube" / "geoseg.gpkg", layer="car")
    assert sorted(cube_cars.geometry.to_wkt()) == sorted(file_cars.geometry.to_wkt())
    assert (tmp_path / "cube" / "project.qgz").exists() and done.item is not None  # no imagery to draw: layers only


def test_a_detectors_folder_has_a_stac_item_with_its_layers(tmp_path, synchronous) -> None:
    import pystac

    model = detector_onnx(tmp_path / "det.onnx", "yolov5", {**DET_META, "det_type": "YOLO_v5_or_v7_default"})
    src = scene(tmp_path / "scene.tif")
    done = geoseg.segment(str(src), str(model), tmp_path / "out", chunk=64, date="2024-05-01")
    assert done.item == str(tmp_path / "out" / "item.json") and "item.json" in done.files()
    item = pystac.Item.from_file(done.item)
    props = item.properties
    assert props["label:tasks"] == ["detection"] and props["label:type"] == "vector"
    assert props["label:classes"] == [{"name": "class", "classes": ["car", "tree"]}]
    assert props["mlm:tasks"] == ["object-detection"] and props["mlm:output"][0]["tasks"] == ["object-detection"]
    assert [c["name"] for c in props["mlm:output"][0]["classification:classes"]] == ["car", "tree"]
    assert item.datetime.isoformat().startswith("2024-05-01") and "mask" not in item.assets
    assert not any(ext.startswith("https://stac-extensions.github.io/raster/") for ext in item.stac_extensions)
    data = {k for k, a in item.assets.items() if "data" in (a.roles or [])}
    assert {"gpkg", "geojson-car", "geojson-tree"} <= data
    for key, asset in item.assets.items():
        if key != "model":
            assert Path(asset.get_absolute_href()).is_file(), key
    assert item.assets["run"].roles == ["metadata"] and item.assets["vectors"].roles == ["metadata"]
    # the footprint is the grid looked at, in lon/lat
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["output_grid"]["width"] == 230 and run["output_grid"]["crs"] == "EPSG:32633"
    assert item.bbox[0] < item.bbox[2] and -90 < item.bbox[1] < 90
