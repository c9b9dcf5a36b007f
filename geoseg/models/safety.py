"""The trust model for model files: what geoseg checks before it loads one (no torch here).

- **ONNX** (``.onnx``) is a graph of operators: loading it runs nothing that came with the
  file. It is the recommended format and what the bundled models are.
- **State dicts** are loaded with ``torch.load(weights_only=True)``: only tensors and plain
  containers are unpickled (see :func:`geoseg.models.loading.load_state_dict_model`).
- **torch.export archives** (``.pt2``) are refused when any entry would be unpickled on
  load (``use_pickle`` payloads, custom or opaque objects, legacy weight files), when they
  carry compiled code (AOTInductor, ExecuTorch), or when the graph calls file or
  serialisation operators. The sample inputs are unpickled by torch with ``weights_only``
  first and, on failure, without it: they are checked with ``weights_only`` at load
  (:mod:`geoseg.models.loading`), and refused if that fails.
- **TorchScript** (``.pt``) is code: ``__setstate__`` runs at load and the operator set
  includes file access (``torch.from_file``). Its archive's code is scanned, and a file
  that defines ``__setstate__`` or calls file, serialisation or non-core operators is
  refused unless the caller trusts it explicitly (``trust_model=True``,
  ``--trust-model``). A TorchScript file is only ever loaded from a path the user named:
  bundled model names always resolve to the bundled files, never to a file of that name
  in the current folder.

Whatever passes is hashed (sha256) when it is resolved; a worker refuses a file whose hash
changed since.
"""

from __future__ import annotations

import json
import re
import zipfile

from geoseg.errors import ModelError

__all__ = ["check_exported", "check_torchscript", "scan_model"]

#: TorchScript calls that touch files or serialisation, or run code at load
_TS_CALLS = re.compile(
    r"\b(?:torch|ops\.aten|ops\.prim)\s*\.\s*(\w*(?:from_file|save|load|pickle|storage|_C\b|open|system|popen)\w*)\s*\("
)
_TS_SETSTATE = re.compile(r"\bdef\s+__setstate__\s*\(")
_TS_NAMESPACE = re.compile(r"\bops\s*\.\s*(\w+)\s*\.")
_CORE_NAMESPACES = {"aten", "prim", "quantized"}
#: exported-graph operator targets that touch files or serialisation
_EXPORT_TARGET = re.compile(r"(from_file|save|load|pickle|_C\.|storage)", re.IGNORECASE)
_MAX_CODE_BYTES = 64 << 20


def _refuse(path: str, why: str, trusted_ok: bool = True) -> ModelError:
    fix = (
        "; if you wrote this model and trust it, pass trust_model=True, or export it as ONNX"
        if trusted_ok
        else "; export the model again with torch.export.save from plain tensors, or as ONNX"
    )
    return ModelError(f"{path}: refused: {why}{fix}")


def check_torchscript(path: str) -> None:
    """Refuse a TorchScript archive whose code can act at load or touch files.

    Raises
    ------
    ModelError
        ``__setstate__`` defined, a file/serialisation operator called, a non-core operator
        namespace used, or an archive too large to scan.
    """
    try:
        with zipfile.ZipFile(path) as z:
            total = 0
            for info in z.infolist():
                name = info.filename
                if "/code/" not in name or not name.endswith(".py"):
                    continue
                total += info.file_size
                if total > _MAX_CODE_BYTES:
                    raise _refuse(path, "the TorchScript code is too large to check")
                text = z.read(info).decode("utf-8", "replace")
                if _TS_SETSTATE.search(text):
                    raise _refuse(path, f"its TorchScript code defines __setstate__ ({name}), which runs when it loads")
                hit = _TS_CALLS.search(text)
                if hit:
                    raise _refuse(path, f"its TorchScript code calls {hit.group(1)!r} ({name}), which can read or write files")
                for ns in _TS_NAMESPACE.findall(text):
                    if ns not in _CORE_NAMESPACES:
                        raise _refuse(path, f"its TorchScript code calls operators of the {ns!r} library ({name})")
    except zipfile.BadZipFile as exc:
        raise ModelError(f"{path}: a damaged model archive ({exc}); export the model again") from exc


def check_exported(path: str) -> None:
    """Refuse a torch.export archive whose loading would unpickle data or run compiled code.

    Raises
    ------
    ModelError
        Pickled payloads, custom/opaque objects, legacy weight files, AOTInductor or
        ExecuTorch code, or file/serialisation operators in the graph.
    """
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            strip = [n.split("/", 1)[1] if "/" in n else n for n in names]
            for n in strip:
                if n.startswith(("data/aotinductor/", "data/executorch/", "data/mtia")):
                    raise _refuse(path, f"it carries compiled code ({n}), which geoseg never loads", trusted_ok=False)
                if re.fullmatch(r"data/(weights|constants)/[^/]+\.pt", n):
                    raise _refuse(path, f"it stores {n} in the legacy pickled format", trusted_ok=False)
            for full, n in zip(names, strip, strict=True):
                if re.fullmatch(r"data/(weights|constants)/[^/]+_config\.json", n):
                    cfg = _json(z, full, path)
                    entries = cfg.get("config", {}) if isinstance(cfg, dict) else {}
                    for key, meta in entries.items() if isinstance(entries, dict) else ():
                        if not isinstance(meta, dict):
                            continue
                        if meta.get("use_pickle"):
                            raise _refuse(path, f"its entry {key!r} is pickled (use_pickle), and unpickling runs code", False)
                        pn = str(meta.get("path_name", ""))
                        if pn.startswith(("custom_obj_", "opaque_obj_")):
                            raise _refuse(path, f"its entry {key!r} is a pickled custom object ({pn})", False)
                elif n.startswith("models/") and n.endswith(".json"):
                    for target in _targets(_json(z, full, path)):
                        if _EXPORT_TARGET.search(target):
                            raise _refuse(path, f"its graph calls {target}, which can read or write files", False)
    except zipfile.BadZipFile as exc:
        raise ModelError(f"{path}: a damaged model archive ({exc}); export the model again") from exc


def _json(z: zipfile.ZipFile, name: str, path: str):
    info = z.getinfo(name)
    if info.file_size > _MAX_CODE_BYTES:
        raise _refuse(path, f"{name} is too large to check", False)
    try:
        return json.loads(z.read(name))
    except (ValueError, RecursionError):
        raise ModelError(f"{path}: {name} is not valid JSON; export the model again") from None


def _targets(obj, depth: int = 0):
    """Every string under a ``target`` key of a serialised exported program."""
    if depth > 200:
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "target" and isinstance(v, str):
                yield v
            else:
                yield from _targets(v, depth + 1)
    elif isinstance(obj, list):
        for v in obj:
            yield from _targets(v, depth + 1)


def scan_model(path: str, kind: str, trust: bool = False) -> None:
    """Check a model file of ``kind`` before anything loads it (see the module docstring).

    ``trust`` lifts the TorchScript code checks only; pickled or compiled payloads in
    ``.pt2`` archives are refused whatever it says.
    """
    if kind == "exported":
        check_exported(path)
    elif kind == "torchscript" and not trust:
        check_torchscript(path)
