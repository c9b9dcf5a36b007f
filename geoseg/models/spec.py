"""What a model is, as the engine plans with it: spec, card and runtime options (no torch).

A :class:`ModelSpec` names a model by content hash and says how to load it (a file path,
or the serialized bytes of an in-memory ``torch.nn.Module``). It is what the task graph
carries; workers turn it into a predictor once and keep it (see
:mod:`geoseg.models.runtime`).

A :class:`~geoseg.models.card.ModelCard` (in :mod:`geoseg.models.card`) says what the
model means: classes and colours, tile and halo defaults, the output activation. Bare model
files get a default card.
"""

from __future__ import annotations

import hashlib
import os
import weakref
from dataclasses import dataclass, field, replace
from typing import Any

from geoseg.errors import ModelError
from geoseg.models.bundled import BUNDLED, bundled_card, bundled_path
from geoseg.models.card import ModelCard, card_from_dict
from geoseg.models.card_sources import find_card
from geoseg.models.download import sha256_file
from geoseg.models.safety import scan_model
from geoseg.models.zoo import cached_model

__all__ = ["IN_MEMORY_MODELS", "PRECISIONS", "ModelSpec", "Runtime", "resolve_model"]


#: ``precision=`` values: exact fp32, the fastest reduced precision this device has, or one named outright
PRECISIONS = ("fp32", "fast", "bf16", "fp16")


# A qualitative palette (colour-blind aware first entries); class 0 is transparent-ish grey.
@dataclass(frozen=True)
class Runtime:
    """How a worker runs a model: device, precision, batch size, CPU threads.

    ``device`` is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; asking for CUDA where there is
    none is an error, never a silent CPU run. ``precision`` ``fast`` computes in bf16 on CPUs
    that have it (torch autocast; OpenVINO for ONNX) and fp16 on GPUs (torch autocast);
    ``bf16``/``fp16`` ask for that arithmetic outright. ``num_threads`` sets torch/onnxruntime intra-op threads in each worker.
    ``scale`` (model pixels per raster pixel) != 1 resamples every tile to ``model_size``
    pixels a side (the model's pixel size) and its logits back. ``tta`` > 1 runs every
    batch in that many dihedral views (flips, then rotations) and averages the logits.
    ``threshold`` (binary models) makes class 1 where its probability is at least this,
    instead of the larger class.
    """

    device: str = "auto"
    precision: str = "fp32"
    batch_size: int = 1
    num_threads: int | None = None
    scale: float = 1.0
    model_size: int = 0
    tta: int = 1
    threshold: float | None = None

    def __post_init__(self) -> None:
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            raise ModelError(f"threshold must be a probability in (0, 1], got {self.threshold!r}")
        if self.tta not in (1, 2, 4, 8):
            raise ModelError(f"tta must be 1, 2, 4 or 8 views, got {self.tta!r}")
        if self.precision not in PRECISIONS:
            raise ModelError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.batch_size < 1:
            raise ModelError(f"batch size must be >= 1, got {self.batch_size}")
        d = self.device
        if not (d in ("auto", "cpu", "cuda") or (d.startswith("cuda:") and d[5:].isdigit())):
            raise ModelError(f"device must be auto, cpu, cuda or cuda:N, got {d!r}")


@dataclass(frozen=True)
class ModelSpec:
    """A model by content hash plus how to load it (travels in the task graph).

    Parameters
    ----------
    kind : str
        ``torchscript``, ``exported`` (a ``torch.export`` ``.pt2`` archive), ``onnx``, ``statedict``
        (``torch.save(model.state_dict())`` plus a card naming the architecture) or ``module``.
    sha256 : str
        Content hash; the worker cache key.
    card : ModelCard
        What the model means.
    path : str, optional
        Model file (``torchscript``, ``onnx``).
    payload : bytes, optional
        Serialized ``nn.Module`` (``module``), shipped once per worker.
    """

    kind: str
    sha256: str
    card: ModelCard
    path: str | None = None
    payload: bytes | None = field(default=None, repr=False)

    @property
    def id(self) -> str:
        """Short human id: card name plus the first 12 hex digits of the hash."""
        return f"{self.card.name}@{self.sha256[:12]}"

    def __dask_tokenize__(self) -> tuple:
        return ("geoseg.ModelSpec", self.kind, self.sha256, self.card)


def _sniff_kind(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(4)
    if path.lower().endswith(".onnx"):
        return "onnx"
    if head[:2] == b"PK":  # TorchScript, torch.export and torch.save archives are all zip files
        import zipfile

        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except zipfile.BadZipFile as exc:
            raise ModelError(f"{path}: a damaged model archive ({exc}); export the model again") from exc
        if any(n.endswith("archive_format") for n in names):
            return "exported"
        if any(n.endswith("/constants.pkl") for n in names) or any("/code/" in n for n in names):
            return "torchscript"
        if path.lower().endswith(".pt2"):
            raise ModelError(f"{path}: not a torch.export archive; export the model again with torch.export.save")
        if any(n.endswith("/data.pkl") for n in names):
            return "checkpoint"  # torch.save: a state dict when its card names the architecture, else refused
        return "torchscript"
    raise ModelError(
        f"{path}: not an ONNX model (.onnx), a torch.export archive (.pt2) or a TorchScript archive (.pt); export the "
        "model with torch.onnx.export"
    )


# In-process registry so threads/synchronous schedulers use a module without unpickling it
# (weak: a module the caller drops is not kept alive here).
IN_MEMORY_MODELS: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()


def resolve_model(model: Any, card: ModelCard | None = None, trust: bool = False) -> ModelSpec:
    """Turn what a user passed as ``model`` into a :class:`ModelSpec`.

    Parameters
    ----------
    model : str, os.PathLike, ModelSpec or torch.nn.Module
        A bundled model name (``geoseg models``), a model pulled into the cache by name
        (``geoseg models pull NAME``, resolved offline), an ONNX, TorchScript, ``torch.export`` or
        state-dict file, a spec, or an in-memory module. A bare bundled name always means the
        bundled model, even when a file of that name is in the current folder (write
        ``./name`` for the file).
    card : ModelCard, optional
        Overrides the default card.
    trust : bool
        Load a TorchScript file whose code defines ``__setstate__`` or calls file or
        serialisation operators (refused otherwise; see :mod:`geoseg.models.safety`).

    Returns
    -------
    ModelSpec

    Raises
    ------
    ModelError
        The file is missing, of no known kind, or refused by the safety checks; a catalogued
        model not pulled yet (the message says ``geoseg models pull NAME``); a pulled file that
        changed since.
    """
    if isinstance(model, ModelSpec):
        return model if card is None else replace(model, card=card)
    pulled = None
    if isinstance(model, str):
        if model in BUNDLED:  # a bare bundled name, never a file in the current folder
            name = model
            card = card or card_from_dict(bundled_card(name), f"bundled model {name!r}")
            model = bundled_path(name)
        else:  # a model pulled into the cache by name (geoseg models pull NAME), offline; else a path
            pulled = cached_model(model)
            model = pulled[0] if pulled else model
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if not os.path.isfile(path):
            raise ModelError(
                f"{path}: model file not found; give an ONNX .onnx (or TorchScript .pt, torch.export .pt2) file, or a bundled "
                "model name (see `geoseg models`)"
            )
        sha = sha256_file(path)
        if pulled and sha != pulled[1]:  # checked before anything reads the file
            raise ModelError(
                f"{path}: the cached model changed since it was pulled (sha256 {sha}, recorded {pulled[1]}); "
                f"pull it again: geoseg models pull {os.path.basename(path)[:-5]} --force"
            )
        kind = _sniff_kind(path)

        scan_model(path, kind, trust)
        name = os.path.splitext(os.path.basename(path))[0]
        if card is None:
            card = find_card(path, kind)
        if kind == "checkpoint":
            if card is None or not card.architecture_json:
                raise ModelError(
                    f"{path}: a torch.save checkpoint, not TorchScript. A state dict loads (weights_only, never unpickled "
                    "code) when a card beside it (MODEL.card.yaml) names its architecture, e.g. architecture: {name: "
                    "smp.Unet, args: {encoder_name: resnet34}}; a pickled whole model is refused: export it with "
                    "torch.onnx.export"
                )
            kind = "statedict"
        return ModelSpec(kind, sha, card or ModelCard(name=name), path=os.path.abspath(path))
    if hasattr(model, "forward") and hasattr(model, "state_dict"):
        import cloudpickle

        payload = cloudpickle.dumps(model)
        sha = hashlib.sha256(payload).hexdigest()
        IN_MEMORY_MODELS[sha] = model
        return ModelSpec("module", sha, card or ModelCard(name=type(model).__name__), payload=payload)
    raise ModelError(f"cannot use {type(model).__name__} as a model; give a .pt/.onnx path or a torch.nn.Module")
