"""Export networks as ONNX with their card inside (what ``geoseg train`` and the bundled recipes write).

ONNX is geoseg's model format with a future: ``torch.jit`` (TorchScript) is deprecated
from torch 2.13 on, onnxruntime is the fastest CPU backend measured here, and an ONNX
file is a graph of operators, never code, so loading one runs nothing that came with it.
The export goes through ``torch.export`` (the dynamo-based ``torch.onnx.export``) with the
batch, height and width dynamic; the card travels as ONNX ``metadata_props["geoseg_card"]``
and is read back by :func:`geoseg.models.card_sources.find_card`. Every export is checked: the
file is loaded by onnxruntime and must give torch's output on a test batch.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from typing import Any

import numpy as np
import torch
from torch import nn

from geoseg.errors import ModelError
from geoseg.models.card import card_from_dict

__all__ = ["LogitBias", "export_onnx"]


class LogitBias(nn.Module):
    """A network with a constant added to each output channel's logit.

    A binary model whose decision threshold was tuned to ``t`` (class 1 where its
    probability is at least ``t``) is exported with ``bias = [0, -log(t / (1 - t))]``:
    argmax then applies the tuned threshold, and the softmax probabilities are those of
    the tuned decision (0.5 at the threshold).
    """

    def __init__(self, net: nn.Module, bias: list[float]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("bias", torch.tensor(bias, dtype=torch.float32).reshape(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the wrapped network plus the per-channel bias."""
        return self.net(x) + self.bias


@contextlib.contextmanager
def _quiet():
    """Keep the exporter's progress lines and registry notes out of the user's terminal."""
    names = ("torch.onnx", "torch.export", "torch._export", "torch.fx", "onnxscript", "torch._dynamo")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.redirect_stdout(io.StringIO()):
                yield
    finally:
        for n, lv in levels.items():
            logging.getLogger(n).setLevel(lv)


def export_onnx(
    model: nn.Module,
    card: dict[str, Any],
    path: str | os.PathLike,
    in_channels: int,
    *,
    example_size: int = 64,
    check: bool = True,
    opset: int = 18,
) -> str:
    """Write ``model`` as ONNX at ``path`` with ``card`` embedded, atomically.

    Parameters
    ----------
    model : torch.nn.Module
        Takes ``(N, in_channels, H, W)`` float32 and returns ``(N, classes, H, W)`` logits.
    card : dict
        The model card (validated by :func:`geoseg.models.card.card_from_dict` first: geoseg
        never writes a model whose card it would refuse).
    path : str or os.PathLike
        The ``.onnx`` file.
    in_channels : int
        Input bands.
    example_size : int
        Height and width of the example batch the graph is traced with (a multiple of the
        network's size multiple); the exported graph takes any batch, height and width.
    check : bool
        Load the file with onnxruntime and compare with torch on a test batch.
    opset : int
        ONNX opset.

    Returns
    -------
    str
        The path written.

    Raises
    ------
    ModelError
        The card is refused, the export fails, or onnxruntime disagrees with torch.
    """
    import onnx

    path = os.fspath(path)
    card_from_dict(card, f"{path} (card)")
    model = model.cpu().eval()
    example = torch.zeros(1, in_channels, example_size, example_size)
    dims = {0: torch.export.Dim("batch", min=1, max=4096), 2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC}
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with _quiet():
            torch.onnx.export(
                model,
                (example,),
                tmp,
                input_names=["input"],
                output_names=["logits"],
                dynamic_shapes=(dims,),
                opset_version=opset,
                external_data=False,
                verbose=False,
            )
        proto = onnx.load(tmp)
        meta = {p.key: p.value for p in proto.metadata_props}
        meta["geoseg_card"] = json.dumps(card, sort_keys=True, default=str)
        del proto.metadata_props[:]
        for k, v in sorted(meta.items()):
            proto.metadata_props.add(key=k, value=v)
        proto.producer_name = "geoseg"
        onnx.save(proto, tmp)
        if check:
            _check(model, tmp, in_channels, example_size)
        os.replace(tmp, path)
    except ModelError:
        raise
    except Exception as exc:  # the exporter raises many types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ModelError(f"{path}: ONNX export failed ({first}); the network must be traceable by torch.export") from exc
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _check(model: nn.Module, path: str, in_channels: int, size: int) -> None:
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, in_channels, size * 2, size + size // 2)).astype(np.float32)
    with torch.inference_mode():
        want = model(torch.from_numpy(x)).numpy()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    got = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    err = float(np.abs(got - want).max()) if got.shape == want.shape else float("inf")
    if not err <= 1e-3 * max(1.0, float(np.abs(want).max())):
        raise ModelError(f"{path}: onnxruntime disagrees with torch on the exported model (max difference {err:.3g})")
