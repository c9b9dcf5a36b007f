"""Models: specs and cards (no torch) and the worker-side runtime (torch, onnxruntime).

Importing this package does not import torch; :mod:`geoseg.models.runtime` does, and only
worker tasks import it.
"""

from geoseg.models.card import ClassInfo, ModelCard, default_palette
from geoseg.models.spec import ModelSpec, Runtime, resolve_model

__all__ = ["ClassInfo", "ModelCard", "ModelSpec", "Runtime", "default_palette", "resolve_model"]
