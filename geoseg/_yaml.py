"""Reading untrusted YAML text (model cards, workflow files) into plain data, with one-line errors.

Costs are bounded before anything is built: a file is read only when it is a regular file
of at most :data:`MAX_TEXT_BYTES`, and a document whose aliases would expand to more than
:data:`MAX_EXPANDED_NODES` values (an "alias bomb": a few hundred bytes that become
millions of values once written out as JSON) or that refers to itself is refused.
"""

from __future__ import annotations

import os
import stat
from typing import Any

__all__ = ["MAX_EXPANDED_NODES", "MAX_TEXT_BYTES", "flat", "load_yaml", "read_text_file"]

#: Largest card or workflow file read (bytes).
MAX_TEXT_BYTES = 1 << 20
#: Most values (scalars, lists, mappings) a document may hold once every alias is expanded.
MAX_EXPANDED_NODES = 20_000


def flat(text: str) -> str:
    """``text`` on one line: line breaks and other control characters written as Python escapes."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def read_text_file(path: str, origin: str, error: type[Exception], what: str = "file", limit: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of a regular file of at most ``limit`` bytes, or ``error`` with one line.

    Devices (``/dev/zero``), FIFOs and folders are refused without reading them (a link to
    one is followed and refused too); so is a file larger than ``limit``.

    Parameters
    ----------
    path : str
        The file.
    origin : str
        How the file is named in messages.
    error : type
        The exception raised (a :class:`geoseg.errors.GeosegError` subclass).
    what : str
        What the file is, for messages (``card``, ``workflow file``).
    limit : int
        Largest size read, in bytes.

    Returns
    -------
    str
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block the open
    except OSError as exc:
        raise error(f"{origin}: cannot read the {what} ({exc.strerror or exc}); check the file and its permissions") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{origin}: the {what} is not a regular file (a device, FIFO or folder); give a text file")
        if st.st_size > limit:
            raise error(f"{origin}: the {what} is {st.st_size} bytes, more than the {limit} a {what} may have; shorten it")
        chunks: list[bytes] = []
        size = 0
        while size <= limit:  # the file may grow after fstat
            chunk = os.read(fd, min(1 << 16, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise error(f"{origin}: the {what} is more than {limit} bytes; shorten it")
    except OSError as exc:
        raise error(f"{origin}: cannot read the {what} ({exc.strerror or exc}); check the file and its permissions") from None
    finally:
        os.close(fd)
    try:
        return b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{origin}: the {what} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None


def _expanded_size(root: Any, limit: int) -> int:
    """Values in the node tree with every alias expanded; stops counting past ``limit``.

    Raises ``ValueError`` for a node that contains itself (a recursive alias).
    """
    import yaml

    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: Any) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ValueError("an alias refers to a value that contains it")
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            sizes[key] = 1
            return 1
        active.add(key)
        total = 1
        for child in children:
            total += size(child)
            if total > limit:
                break
        active.discard(key)
        sizes[key] = min(total, limit + 1)
        return sizes[key]

    return size(root)


def load_yaml(
    text: str, origin: str, error: type[Exception], fix: str, compose: bool = False, max_nodes: int = MAX_EXPANDED_NODES
) -> Any:
    """``yaml.safe_load`` (and with ``compose`` also the node tree, for line numbers), or ``error``.

    Every failure of the parser (syntax errors, nesting too deep, scalars its constructors
    cannot build such as ``2024-02-30`` or ``!!int x``) becomes ``error`` with one line
    ``ORIGIN[:LINE]: not valid YAML (...); FIX``. Text longer than :data:`MAX_TEXT_BYTES`,
    aliases that expand to more than ``max_nodes`` values and aliases that refer to
    themselves are refused before any value is built.
    """
    import yaml

    if len(text) > MAX_TEXT_BYTES:
        raise error(f"{origin}: {len(text)} characters, more than the {MAX_TEXT_BYTES} a YAML file may have; shorten it")
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            if node is not None:
                try:
                    n = _expanded_size(node, max_nodes)
                except ValueError as exc:
                    raise error(f"{origin}: not valid YAML ({exc}); write the values out") from None
                if n > max_nodes:
                    raise error(
                        f"{origin}: its aliases expand to more than {max_nodes} values (an alias bomb); write the values out"
                    )
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
        return (data, yaml.compose(text)) if compose else data
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f":{mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
        raise error(f"{origin}{at}: not valid YAML ({flat(problem)}); {fix}") from exc
    except RecursionError:
        raise error(f"{origin}: not valid YAML (nested too deeply); flatten the structure") from None
    except error:
        raise
    except Exception as exc:  # PyYAML's constructors raise ValueError, OverflowError, ... on odd scalars
        reason = flat((str(exc).splitlines() or [""])[0]) or type(exc).__name__
        raise error(f"{origin}: not valid YAML (a value cannot be read: {reason}); fix or quote the value") from None
