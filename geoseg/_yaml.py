"""Reading untrusted YAML text (model cards, workflow files) into plain data, with one-line errors."""

from __future__ import annotations

from typing import Any

__all__ = ["flat", "load_yaml"]


def flat(text: str) -> str:
    """``text`` on one line: line breaks and other control characters written as Python escapes."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def load_yaml(text: str, origin: str, error: type[Exception], fix: str, compose: bool = False) -> Any:
    """``yaml.safe_load`` (and with ``compose`` also the node tree, for line numbers), or ``error``.

    Every failure of the parser (syntax errors, nesting too deep, scalars its constructors
    cannot build such as ``2024-02-30`` or ``!!int x``) becomes ``error`` with one line
    ``ORIGIN[:LINE]: not valid YAML (...); FIX``.
    """
    import yaml

    try:
        data = yaml.safe_load(text)
        return (data, yaml.compose(text)) if compose else data
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f":{mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
        raise error(f"{origin}{at}: not valid YAML ({flat(problem)}); {fix}") from exc
    except RecursionError:
        raise error(f"{origin}: not valid YAML (nested too deeply); flatten the structure") from None
    except Exception as exc:  # PyYAML's constructors raise ValueError, OverflowError, ... on odd scalars
        reason = flat((str(exc).splitlines() or [""])[0]) or type(exc).__name__
        raise error(f"{origin}: not valid YAML (a value cannot be read: {reason}); fix or quote the value") from None
