"""No code from data: model files that would run code when loaded are refused before anything loads them.

Each attack is shown to work against torch itself first (the payload runs when torch loads the
file), so each refusal test can fail.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Tuple  # noqa: UP035 - TorchScript needs typing.Tuple

import pytest
import torch

import geoseg
from geoseg.errors import ModelError
from geoseg.models.spec import resolve_model


class Evil(torch.nn.Module):
    """A TorchScript module whose ``__setstate__`` (run by ``torch.jit.load``) writes into a file."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, bool]:  # noqa: UP006
        return (self.target, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, bool]) -> None:  # noqa: UP006
        self.target = state[0]
        t = torch.from_file(self.target, shared=True, size=8, dtype=torch.uint8)
        self.training = bool(t.fill_(88).sum() > 0) and state[1]  # used, so TorchScript keeps the write

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, :1], -x[:, :1]], dim=1)


class FileToucher(torch.nn.Module):
    """No ``__setstate__``, but a forward pass that maps a file (a file-write primitive)."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.from_file(self.target, shared=True, size=8, dtype=torch.uint8)
        return torch.cat([x[:, :1], -x[:, :1]], dim=1) + t.fill_(89).sum() * 0


class Plain(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, :1], -x[:, :1]], dim=1)


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    p = tmp_path / "victim.txt"
    p.write_bytes(b"original")
    return p


def _jit_save(module: torch.nn.Module, path: Path) -> Path:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(module), str(path))
    return path


def _jit_load(path: Path) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.load(str(path))


def test_torchscript_setstate_payload_runs_in_torch_but_geoseg_refuses_it(tmp_path: Path, victim: Path) -> None:
    evil = _jit_save(Evil(str(victim)), tmp_path / "evil.pt")
    _jit_load(evil)  # torch runs the payload on load ...
    assert victim.read_bytes() == b"X" * 8
    victim.write_bytes(b"original")
    with pytest.raises(ModelError, match=r"__setstate__.*trust") as err:  # ... geoseg never loads it
        resolve_model(str(evil))
    assert "\n" not in str(err.value)
    assert victim.read_bytes() == b"original"


def test_torchscript_file_access_refused_then_allowed_by_an_explicit_trust_flag(tmp_path: Path, victim: Path) -> None:
    toucher = _jit_save(FileToucher(str(victim)), tmp_path / "toucher.pt")
    with pytest.raises(ModelError, match="from_file"):
        resolve_model(str(toucher))
    assert resolve_model(str(toucher), trust=True).kind == "torchscript"  # the user named it and trusts it
    assert victim.read_bytes() == b"original"  # resolving never runs it


def test_plain_torchscript_still_loads(tmp_path: Path, make_raster) -> None:
    model = _jit_save(Plain(), tmp_path / "plain.pt")
    src = make_raster(64, 64, bands=1)
    with geoseg.scheduler("synchronous"):
        mask = geoseg.predict(str(src), str(model), tile=64, halo=0).compute()
    assert set(mask.values.ravel().tolist()) <= {0, 1}


def _export_pt2(path: Path) -> Path:
    ep = torch.export.export(torch.nn.Conv2d(1, 2, 3, padding=1), (torch.zeros(1, 1, 16, 16),))
    torch.export.save(ep, str(path))
    return path


class _Payload:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _poison_pt2(src: Path, dst: Path, marker: Path) -> Path:
    """Mark the first weight ``use_pickle`` and replace its bytes with a pickle that runs a command."""
    with zipfile.ZipFile(src) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    cfg_name = next(n for n in entries if n.endswith("_weights_config.json"))
    cfg = json.loads(entries[cfg_name])
    meta = next(iter(cfg["config"].values()))
    meta["use_pickle"] = True
    entries[cfg_name] = json.dumps(cfg).encode()
    weight = next(n for n in entries if n.endswith(f"data/weights/{meta['path_name']}"))
    buf = io.BytesIO()
    pickle.dump(_Payload(str(marker)), buf)
    entries[weight] = buf.getvalue()
    with zipfile.ZipFile(dst, "w") as z:
        for n, b in entries.items():
            z.writestr(n, b)
    return dst


def test_pt2_pickled_entry_runs_in_torch_but_geoseg_refuses_it_before_loading(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    bad = _poison_pt2(_export_pt2(tmp_path / "good.pt2"), tmp_path / "bad.pt2", marker)
    # torch.export.load unpickles the entry: shown in a child process, so the payload cannot touch this one
    code = f"import torch; torch.export.load({str(bad)!r})"
    subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert marker.exists()
    marker.unlink()
    for name in ("bad.pt2", "renamed.pt"):  # the kind is sniffed from the zip: a new name changes nothing
        path = tmp_path / name
        if not path.exists():
            path.write_bytes(bad.read_bytes())
        with pytest.raises(ModelError, match="use_pickle") as err:
            resolve_model(str(path), trust=True)  # not even a trust flag loads pickles
        assert "\n" not in str(err.value)
    assert not marker.exists()


def test_clean_pt2_resolves(tmp_path: Path) -> None:
    assert resolve_model(str(_export_pt2(tmp_path / "good.pt2"))).kind == "exported"


def test_a_file_named_like_a_bundled_model_is_never_loaded_in_its_place(tmp_path: Path, monkeypatch, victim: Path) -> None:
    _jit_save(Evil(str(victim)), tmp_path / "forest")
    monkeypatch.chdir(tmp_path)
    spec = resolve_model("forest")
    assert spec.kind == "onnx" and spec.path.endswith(os.path.join("weights", "forest.onnx"))
    with pytest.raises(ModelError, match="__setstate__"):
        resolve_model("./forest")  # the file, when named as a path, is checked like any other
    assert victim.read_bytes() == b"original"


def test_cli_refusal_is_one_line_and_nothing_is_written(tmp_path: Path, victim: Path, make_raster) -> None:
    evil = _jit_save(Evil(str(victim)), tmp_path / "evil.pt")
    src = make_raster(64, 64, bands=1)
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, "-m", "geoseg", "predict", str(src), "-m", str(evil), "-o", str(out), "--scheduler", "threads"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("geoseg: error:") and "__setstate__" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (out / "mask.tif").exists()
    assert victim.read_bytes() == b"original"


def test_a_model_file_changed_after_it_was_checked_is_refused_on_the_worker(tmp_path: Path) -> None:
    from geoseg.models.runtime import Predictor
    from geoseg.models.spec import Runtime

    model = _jit_save(Plain(), tmp_path / "plain.pt")
    spec = resolve_model(str(model))
    _jit_save(Evil(str(tmp_path / "x")), model)  # swapped after the check
    with pytest.raises(ModelError, match="changed after it was checked"):
        Predictor(spec, Runtime(device="cpu"))


def test_corrupt_onnx_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "cut.onnx"
    good = Path(geoseg.models.bundled.bundled_path("water")).read_bytes()
    bad.write_bytes(good[: len(good) // 3])
    with pytest.raises(ModelError, match="not a readable ONNX model") as err:
        resolve_model(str(bad))
    assert "\n" not in str(err.value)
