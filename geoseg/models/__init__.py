"""Models: specs and cards (no torch) and the worker-side runtime (torch, onnxruntime).

Importing this package does not import torch; :mod:`geoseg.models.runtime` does, and only
worker tasks import it.
"""

from geoseg.models.card import ModelCard
from geoseg.models.spec import ModelSpec, Runtime, resolve_model

__all__ = ["ModelCard", "ModelSpec", "Runtime", "resolve_model"]
