"""Where a model's card is found, and how it is read (no torch: TorchScript archives are zip files).

A card is a JSON/YAML file beside the model (``model.card.json``, ``model.card.yaml``), or
embedded in it: a TorchScript ``_extra_files`` entry ``geoseg_card.json``, or an ONNX
``metadata_props`` entry ``geoseg_card``. ONNX models made for the Deepness QGIS plugin or
GeoDeep carry their own metadata keys (``class_names``, ``resolution`` in cm/px,
``tiles_size``, ``tiles_overlap`` in percent, ``standardization_mean/std``, ``model_type``,
``det_type``, ``det_conf``, ``det_iou_thresh``, ``seg_thresh``); those are read too, so such
models run unchanged: a ``Detector`` becomes a card with a ``detector`` (boxes, not pixels), a
``Segmentor`` outputs probabilities (activation ``none``) cut at ``seg_thresh`` when binary.
:func:`geoseg.models.card.card_from_dict` checks what is found.
"""

from __future__ import annotations

import ast
import json
import os
import zipfile
from collections.abc import Mapping
from typing import Any

from geoseg._yaml import flat as _flat
from geoseg._yaml import load_yaml, read_text_file
from geoseg.errors import ModelError
from geoseg.models.card import ModelCard, card_from_dict

__all__ = ["find_card", "load_text", "onnx_metadata"]


def load_text(text: str, origin: str) -> Any:
    """Parse a card's text: YAML when ``origin`` ends in ``.yaml``/``.yml``, JSON otherwise.

    Parameters
    ----------
    text : str
        The card file's contents.
    origin : str
        Where it came from (its path), for the file type and for messages.

    Returns
    -------
    Any
        The parsed document (validated later by :func:`card_from_dict`).

    Raises
    ------
    ModelError
        The text is not valid YAML/JSON.
    """
    if origin.endswith((".yaml", ".yml")):
        return load_yaml(text, origin, ModelError, "fix the card's syntax")
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ModelError(f"{origin}: not valid JSON ({_flat(str(exc))}); fix the card's syntax") from exc
    except RecursionError:
        raise ModelError(f"{origin}: not valid JSON (nested too deeply); flatten the card") from None


def _read_text(path: str, origin: str) -> str:
    """A card file's text (UTF-8, a regular file of at most 1 MiB); :class:`ModelError` naming ``origin`` otherwise."""
    return read_text_file(path, origin, ModelError, "card")


def _decode(raw: bytes, origin: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ModelError(f"{origin}: the card is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None


def _sidecars(path: str) -> list[str]:
    stem = os.path.splitext(path)[0]
    return [stem + ext for ext in (".card.json", ".card.yaml", ".card.yml")]


#: Deepness/GeoDeep ``det_type`` values -> geoseg's detector layouts (:mod:`geoseg.models.detector`)
DET_TYPES = {
    "YOLO_v5_or_v7_default": "yolov5",
    "YOLO_v6": "yolov6",
    "YOLO_v9": "ultralytics",
    "YOLO_Ultralytics": "ultralytics",
    "YOLO_Ultralytics_obb": "ultralytics_obb",
    "YOLO_Ultralytics_segmentation": "ultralytics_seg",
}
#: the metadata keys that mark a Deepness/GeoDeep model
DEEPNESS_KEYS = {"class_names", "resolution", "tiles_size", "tiles_overlap", "standardization_mean", "model_type", "det_type"}


def _meta_value(meta: Mapping[str, str], key: str) -> Any:
    """A metadata value: JSON, else a Python literal (Deepness examples store dict reprs), else the text."""
    raw = meta[key]
    try:
        return json.loads(raw)
    except ValueError:
        try:
            return ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            return raw


def _deepness(meta: Mapping[str, str], origin: str) -> dict[str, Any] | None:
    """A card from Deepness/GeoDeep ONNX metadata (class_names, resolution, tiles_size, det_type, seg_thresh, ...)."""
    if not DEEPNESS_KEYS & set(meta):
        return None
    card: dict[str, Any] = {}
    model_type = str(_meta_value(meta, "model_type")) if "model_type" in meta else None
    detector = _deepness_detector(meta, model_type)
    if "class_names" in meta:
        names = _meta_value(meta, "class_names")
        if isinstance(names, Mapping):
            pairs = sorted(names.items(), key=lambda kv: int(kv[0]))
            card["classes"] = [{"id": int(k), "name": str(v)} for k, v in pairs]
        elif isinstance(names, list):
            card["classes"] = [{"id": i, "name": str(v)} for i, v in enumerate(names)]
    if "resolution" in meta:
        card["gsd_m"] = float(_meta_value(meta, "resolution")) / 100.0  # centimetres per pixel
    tile = int(_meta_value(meta, "tiles_size")) if "tiles_size" in meta else None
    if tile:
        card["tile"] = tile
        if "tiles_overlap" in meta:
            card["halo"] = round(tile * float(_meta_value(meta, "tiles_overlap")) / 100.0 / 2.0)
    # both tools feed 8-bit RGB divided by 255, then optional standardisation
    if "standardization_mean" in meta and "standardization_std" in meta:
        mean = [float(v) * 255.0 for v in _meta_value(meta, "standardization_mean")]
        std = [float(v) * 255.0 for v in _meta_value(meta, "standardization_std")]
        card["scaling"] = {"method": "meanstd", "mean": mean, "std": std}
    else:
        card["scaling"] = {"method": "divide", "value": 255.0}
    if detector:
        card["detector"] = detector
        return card
    if model_type == "Segmentor":
        card["activation"] = "none"  # Deepness segmentors output probabilities (it clips them to [0, 1])
    if "seg_thresh" in meta:
        card["threshold"] = float(_meta_value(meta, "seg_thresh"))
    return card


def _deepness_detector(meta: Mapping[str, str], model_type: str | None) -> dict[str, Any] | None:
    """The card's ``detector`` for a Deepness/GeoDeep detector (``model_type`` Detector, or a ``det_type``), else None."""
    if model_type != "Detector" and (model_type is not None or "det_type" not in meta):
        return None
    det_type = str(_meta_value(meta, "det_type")) if "det_type" in meta else "YOLO_v5_or_v7_default"  # GeoDeep's default
    if det_type not in DET_TYPES:
        raise ValueError(f"det_type {det_type!r} is not one of the detector layouts geoseg reads: {', '.join(DET_TYPES)}")
    out: dict[str, Any] = {"layout": DET_TYPES[det_type]}
    for key, name in (("det_conf", "conf"), ("det_iou_thresh", "iou")):
        if key in meta:
            out[name] = float(_meta_value(meta, key))
    return out


def onnx_metadata(path: str) -> dict[str, str]:
    """An ONNX file's ``metadata_props`` (where geoseg keeps the card), read without running it.

    Raises
    ------
    ModelError
        The file is not a readable ONNX model (truncated, corrupt, not ONNX).
    """
    try:
        import onnxruntime as ort  # a core dependency; the onnx package would cost 0.6 s of imports here

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # metadata only: no graph work
        opts.intra_op_num_threads = 1
        sess = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
        return dict(sess.get_modelmeta().custom_metadata_map)
    except ImportError:
        return {}
    except Exception as exc:  # onnxruntime's Fail/InvalidProtobuf (truncated, corrupt, not ONNX)
        reason = _flat((str(exc).splitlines() or [""])[0])[:200] or type(exc).__name__
        raise ModelError(f"{path}: not a readable ONNX model ({reason}); the file may be truncated: export it again") from None


def find_card(path: str, kind: str) -> ModelCard | None:
    """The card of a model file: a sidecar file, else embedded metadata, else None.

    Parameters
    ----------
    path : str
        The model file.
    kind : str
        ``torchscript``, ``exported`` or ``onnx``.

    Returns
    -------
    ModelCard or None
    """
    name = os.path.splitext(os.path.basename(path))[0]
    for side in _sidecars(path):
        if os.path.exists(side):
            return card_from_dict(load_text(_read_text(side, side), side), side, name)
    if kind in ("torchscript", "exported"):
        try:
            with zipfile.ZipFile(path) as z:
                hit = [n for n in z.namelist() if n.endswith("extra/geoseg_card.json")]
                if hit:
                    origin = f"{path} (embedded card)"
                    if z.getinfo(hit[0]).file_size > 1 << 20:
                        raise ModelError(f"{origin}: the card is larger than 1 MiB; a card is a few kilobytes of text")
                    return card_from_dict(load_text(_decode(z.read(hit[0]), origin), path), origin, name)
        except zipfile.BadZipFile as exc:
            raise ModelError(f"{path}: not a valid TorchScript archive ({exc}); re-export the model") from exc
    elif kind == "onnx":
        meta = onnx_metadata(path)
        if "geoseg_card" in meta:
            return card_from_dict(load_text(meta["geoseg_card"], path), f"{path} (geoseg_card metadata)", name)
        try:
            d = _deepness(meta, path)
        except (TypeError, ValueError, AttributeError, ArithmeticError, RecursionError, MemoryError) as exc:
            reason = _flat((str(exc).splitlines() or [""])[0]) or type(exc).__name__
            raise ModelError(f"{path}: unreadable Deepness/GeoDeep metadata ({reason}); fix the model's metadata_props") from None
        if d is not None:
            return card_from_dict(d, f"{path} (Deepness/GeoDeep metadata)", name)
    return None
