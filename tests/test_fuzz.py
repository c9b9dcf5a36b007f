"""Property tests (hypothesis) for the readers of untrusted text: workflow files and model cards.

Property: a reader either returns its result or raises a :class:`~geoseg.errors.GeosegError`
(``InputError`` for workflows, ``ModelError`` for cards) whose message is one line naming the
file; never any other exception. Examples per run (``max_examples``, fixed seed-free search):

==========================================  =========
test                                        examples
==========================================  =========
workflow from arbitrary bytes                     300
workflow from arbitrary text                      300
workflow from YAML-ish token soup                 500
workflow deep nesting / alias bombs                80
workflow from plausible mappings (safe_dump)      400
card_from_dict on arbitrary values                300
card_from_dict on plausible cards                 500
card text (load_text + card_from_dict)           300
find_card on .card.json/.card.yaml sidecars       300
find_card on Deepness/GeoDeep metadata            200
==========================================  =========

3180 examples in all (about 30-45 s on 2 busy cores); ``pytest -s`` prints the tally of accepted and
refused inputs per test at the end of the module.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from geoseg.errors import GeosegError, InputError, ModelError
from geoseg.models import card_sources
from geoseg.models.card import ModelCard, card_from_dict
from geoseg.models.card_sources import find_card
from geoseg.workflows.spec import Workflow, load_workflow

SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]}
TALLY: dict[str, Counter] = {}


@pytest.fixture(scope="module", autouse=True)
def _tally() -> Iterator[None]:
    yield
    for name, c in TALLY.items():
        print(f"{name}: {sum(c.values())} examples ({', '.join(f'{k} {v}' for k, v in sorted(c.items()))})")


@pytest.fixture(scope="module")
def folder() -> Iterator[Path]:
    """A project folder (``<tmp>/proj/workflows/``) reused by every example."""
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "proj" / "workflows").mkdir(parents=True)
        yield Path(d) / "proj"


# ---------------------------------------------------------------- workflows


def _check_workflow(path: Path, name: str) -> None:
    tally = TALLY.setdefault(name, Counter())
    try:
        wf = load_workflow(path)
    except InputError as exc:
        msg = str(exc)
        assert str(path) in msg, msg
        assert "\n" not in msg and "\r" not in msg, msg
        tally["refused"] += 1
        return
    assert isinstance(wf, Workflow)
    project = os.path.realpath(path.parent.parent if path.parent.name == "workflows" else path.parent)
    real = os.path.realpath(wf.outputs.folder)
    assert os.path.commonpath([real, project]) == project, (real, project)
    if wf.sample is not None:  # geoseg writes the sample scene there: never outside the project either
        sample = os.path.realpath(wf.sample)
        assert os.path.commonpath([sample, project]) == project, (sample, project)
    tally["accepted"] += 1


def _write_and_check(folder: Path, data: bytes, name: str) -> None:
    path = folder / "workflows" / "w.yaml"
    path.write_bytes(data)
    _check_workflow(path, name)


@settings(max_examples=300, **SETTINGS)
@given(data=st.binary(max_size=400))
def test_workflow_arbitrary_bytes(folder: Path, data: bytes) -> None:
    _write_and_check(folder, data, "workflow bytes")


@settings(max_examples=300, **SETTINGS)
@given(text=st.text(max_size=400))
def test_workflow_arbitrary_text(folder: Path, text: str) -> None:
    _write_and_check(folder, text.encode("utf-8", "surrogatepass"), "workflow text")


# fmt: off
TOKENS = [
    "name: ", "description: ", "sample: ", "aoi: ", "imagery: ", "models: ", "change: ", "outputs: ", "folder: ",
    "formats: ", "schedule: ", "workers: ", "chunk: ", "scheduler: ", "files: ", "glob: ", "stac: ", "assets: ",
    "date_from: ", "model: ", "tile: ", "halo: ", "path: ", "\n", "\n  ", "\n    ", "- ", "  - ", "[", "]", "{", "}",
    ", ", ": ", "? ", "'", '"', "#c", "&a ", "*a", "&b ", "*b", "<<: ", "!!python/object:os.system ", "!!python/name:os ",
    "!!binary ", "!!timestamp ", "!!int ", "!!float ", "!!set ", "!!omap ", "!!str ", "!!map ", "!!seq ", "!foo ",
    "2024-02-30", "2024-13-01 25:61:61", "2001-12-14t21:59:43.10-05:00", "9999999-01-01", "0x", "0o99", "0b2",
    "1_0", "1:20:30", "-.inf", ".nan", "1e99999", "9" * 400, "~", "null", "yes", "no", "on", "forest", "geojson",
    "out", "../out", "../../x", "/tmp/x", "~/x", '"\\0"', '"\\x00a"', '"\\ud800"', "\t", "%YAML 1.1\n", "%TAG ! !x\n",
    "---\n", "...\n", "|\n  ", ">-\n  ", "\ufeff", "\x85", "\u2028", "=", "!", "@", "`", "0 6 * * 1", "'* * * * 99'",
]
# fmt: on


@settings(max_examples=500, **SETTINGS)
@given(parts=st.lists(st.sampled_from(TOKENS), max_size=40))
def test_workflow_yaml_token_soup(folder: Path, parts: list[str]) -> None:
    _write_and_check(folder, "".join(parts).encode("utf-8", "surrogatepass"), "workflow token soup")


def _bomb(levels: int, width: int) -> str:
    lines = ["l0: &l0 [x" + ", x" * (width - 1) + "]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]")
    return "\n".join(lines)


@st.composite
def nasty_yaml(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["flow_seq", "flow_map", "block_seq", "block_map", "bomb", "cycle"]))
    n = draw(st.integers(1, 2000 if kind.startswith("flow") else 400))
    where = draw(st.sampled_from(["name", "description", "models", "imagery", "outputs", "change", "aoi", "workers", "zz"]))
    if kind == "flow_seq":
        body = "[" * n + "]" * n
    elif kind == "flow_map":
        body = "{a: " * n + "b" + "}" * n
    elif kind == "block_seq":
        body = "\n" + "".join(" " * (i + 2) + "-\n" for i in range(n)) + " " * (n + 2) + "x"
    elif kind == "block_map":
        body = "\n" + "".join(" " * (i + 2) + f"k{i}:\n" for i in range(n)) + " " * (n + 2) + "x"
    elif kind == "bomb":
        levels, width = draw(st.integers(1, 9)), draw(st.integers(1, 6))
        head = _bomb(levels, width)
        return f"{head}\nname: t\nimagery: [a.tif]\nmodels: [forest]\noutputs: {{folder: out}}\n{where}: *l{levels - 1}\n"
    else:
        body = "&c [*c, *c]"
    return f"name: t\nimagery: [a.tif]\nmodels: [forest]\noutputs: {{folder: out}}\n{where}: {body}\n"


@settings(max_examples=80, **SETTINGS)
@given(text=nasty_yaml())
def test_workflow_deep_nesting_and_alias_bombs(folder: Path, text: str) -> None:
    _write_and_check(folder, text.encode(), "workflow nesting/bombs")


# values safe_dump can write: everything YAML can hold, including NaN, huge ints, dates, bytes
JUNK_SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["", " ", "\x00", "a\nb", "~", "~nobody/x", "/", "..", "../..", "-1", "1e999", "nan", "0 6 * * 1"]),
    st.dates(),
    st.binary(max_size=8),
)
JUNK = st.recursive(
    JUNK_SCALAR,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), c, max_size=4),
    max_leaves=12,
)
PATHS = st.one_of(
    st.sampled_from(["a.tif", "data/scene.tif", "out", "../out", "../../elsewhere", "/tmp/x", "~/x", ".", "..", "", "\x00x"]),
    st.text(max_size=20),
)


def _maybe(good: st.SearchStrategy, junk: bool = True) -> st.SearchStrategy:
    """Mostly a plausible value, sometimes (when ``junk``) anything."""
    return st.one_of(good, good, good, JUNK) if junk else good


MODEL_NAMES = st.sampled_from(["forest", "water", "buildings", "ships", "tanks", "nope", ""])


def _extra(junk: bool, *keys: str) -> dict[str, st.SearchStrategy]:
    """Unknown keys, only in junk mode."""
    return {k: JUNK for k in keys} if junk else {}


def _one_source(d: dict[str, Any], key: str) -> dict[str, Any]:
    """An imagery mapping with exactly one source, ``key``."""
    out = {k: v for k, v in d.items() if k not in ("files", "glob", "stac")}
    out[key] = d["files"] if key == "files" else (d.get(key) or "scenes/*.tif")
    return out


def workflows(junk: bool) -> st.SearchStrategy:
    """Workflow mappings from the real keys: plausible values (``junk=False``), or with wrong types and unknown keys."""
    m = lambda good: _maybe(good, junk)  # noqa: E731

    def pick(valid: list[Any], invalid: list[Any]) -> st.SearchStrategy:
        return st.sampled_from(valid + invalid if junk else valid)

    def num(lo: float) -> st.SearchStrategy:
        return st.floats(allow_nan=True, allow_infinity=True) if junk else st.floats(lo, 1e6)

    model_run = st.fixed_dictionaries(
        {"model": m(MODEL_NAMES)},
        optional={
            "bands": m(st.sampled_from(["red=1,green=2,blue=3", "3,2,1", "x"])),
            "tile": m(st.integers(-10 if junk else 8, 1024)),
            "halo": m(st.integers(-10 if junk else 0, 128)),
            "min_area_m2": m(num(0) | st.integers(-5 if junk else 0, 5000)),
            "simplify_m": m(num(0)),
            "regularize": m(st.booleans()),
            **_extra(junk, "unknown"),
        },
    )
    source = st.sampled_from(["files", "glob", "stac"])
    imagery = st.one_of(
        st.lists(m(PATHS), min_size=0 if junk else 1, max_size=3),
        st.fixed_dictionaries(
            {} if junk else {"files": st.lists(PATHS, min_size=1, max_size=3)},
            optional={
                "glob": m(PATHS),
                "stac": m(PATHS),
                "assets": m(st.dictionaries(st.sampled_from(["red", "nir", "blue"]), st.text(max_size=6), max_size=3)),
                "date_from": m(pick(["metadata", "filename"], ["exif"])),
                **_extra(junk, "extra"),
                **({"files": m(st.lists(PATHS, max_size=3))} if junk else {}),
            },
        ).flatmap(lambda d: st.just(d) if junk else source.map(lambda k: _one_source(d, k))),
    )
    change_one = st.fixed_dictionaries(
        {"model": m(MODEL_NAMES)},
        optional={
            "pairs": m(pick(["consecutive", "baseline"], ["all"])),
            "bands": m(st.text(max_size=10)),
            "min_area_m2": m(num(0)),
            "clouds": m(st.booleans()),
            "resampling": m(pick(["nearest", "bilinear", "cubic", "average"], ["lanczos"])),
            **_extra(junk, "oops"),
        },
    )
    outputs = st.fixed_dictionaries(
        {"folder": m(PATHS)},
        optional={
            "formats": m(st.lists(pick(["geojson", "gpkg", "fgb", "parquet"], ["shp"]), max_size=4)),
            "crs": m(st.sampled_from(["EPSG:3035", "EPSG:4326", "nonsense"])),
            "quicklook": m(st.booleans()),
            **_extra(junk, "typo"),
        },
    )
    names = MODEL_NAMES if junk else st.sampled_from(["forest", "water", "buildings"])
    models = st.lists(st.one_of(names, model_run), min_size=0 if junk else 1, max_size=4)
    if not junk:  # unique names
        models = models.filter(lambda v: len({x if isinstance(x, str) else x["model"] for x in v}) == len(v))
    required = {"name": m(st.text(min_size=0 if junk else 1, max_size=10)), "imagery": m(imagery), "outputs": m(outputs)}
    required["models"] = m(models)
    optional = {
        "description": m(st.text(max_size=20)),
        "sample": m(PATHS),
        "aoi": m(PATHS),
        "change": m(st.one_of(change_one, st.lists(change_one, max_size=3))),
        "scheduler": m(st.sampled_from(["local", "synchronous", "threads", "tcp://h:8786"])),
        "workers": m(st.integers(-3 if junk else 1, 64)),
        "chunk": m(st.integers(-3 if junk else 16, 4096)),
        "schedule": m(
            pick(["0 6 * * 1", "* * * * *", "@daily"], ["61 * * * *", "0 6 * * 1 2 3", "*/0 * * * *", "1-0 * * * *"])
            | st.text(alphabet="0123456789*/-, ?LW#@", max_size=20)
        ),
        **_extra(junk, "path", "schedular", "zz"),
    }
    if junk:  # any key may be missing
        optional, required = {**required, **optional}, {}
    return st.fixed_dictionaries(required, optional=optional)


@settings(max_examples=400, **SETTINGS)
@given(data=st.one_of(workflows(junk=False), workflows(junk=True)))
def test_workflow_plausible_mappings(folder: Path, data: dict[str, Any]) -> None:
    _write_and_check(folder, yaml.safe_dump(data, allow_unicode=True).encode("utf-8", "surrogatepass"), "workflow mappings")


# ---------------------------------------------------------------- model cards


def _check_card(fn: Any, origin: str, name: str) -> None:
    tally = TALLY.setdefault(name, Counter())
    try:
        card = fn()
    except (ModelError, GeosegError) as exc:
        msg = str(exc)
        assert origin in msg, msg
        assert "\n" not in msg, msg
        tally["refused"] += 1
        return
    assert card is None or isinstance(card, ModelCard)
    tally["accepted" if card is not None else "no card"] += 1


JSON_SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=10),
)
JSONISH = st.recursive(
    JSON_SCALAR, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12
)
# YAML gives more than JSON: int keys, dates, bytes
YAMLISH = st.recursive(
    st.one_of(JSON_SCALAR, st.dates(), st.binary(max_size=6)),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), c, max_size=4),
    max_leaves=12,
)
ODD_NUMBERS = st.one_of(
    st.integers(-300, 300),
    st.sampled_from([10**400, -(10**400), 2**63, True, False, 0, -0.0, 1e308]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.sampled_from(["nan", "inf", "-inf", "1e999", "10", ""]),
)
NUMBERS_OR_LISTS = st.one_of(
    ODD_NUMBERS, st.lists(ODD_NUMBERS, max_size=5), st.lists(st.lists(ODD_NUMBERS, max_size=2), max_size=3)
)
CLASS = st.one_of(
    st.fixed_dictionaries(
        {"id": _maybe(st.integers(-5, 300) | ODD_NUMBERS), "name": _maybe(st.text(max_size=8))},
        optional={
            "color": _maybe(
                st.lists(st.integers(-5, 300), max_size=5)
                | st.sampled_from(["#00ff00", "#0f0", "red", "#gggggg"])
                | st.lists(ODD_NUMBERS, min_size=3, max_size=3)
            ),
            "kind": JSONISH,
            "extra": JSONISH,
        },
    ),
    st.text(max_size=5),
    st.lists(st.integers(0, 5), max_size=3),
)
SCALING = st.fixed_dictionaries(
    {},
    optional={
        "method": _maybe(st.sampled_from(["none", "divide", "meanstd", "minmax", "percentile", "zscore"])),
        "value": _maybe(ODD_NUMBERS),
        "mean": _maybe(NUMBERS_OR_LISTS),
        "std": _maybe(NUMBERS_OR_LISTS),
        "low": _maybe(NUMBERS_OR_LISTS),
        "high": _maybe(NUMBERS_OR_LISTS),
        "clip": _maybe(st.booleans() | st.sampled_from([0, 1, "yes", None])),
        "extra": JSONISH,
    },
)
CARD = st.fixed_dictionaries(
    {},
    optional={
        "name": _maybe(st.text(max_size=8)),
        "version": JSONISH,
        "task": _maybe(st.sampled_from(["area", "objects", "detect"])),
        "description": JSONISH,
        "license": JSONISH,
        "classes": _maybe(st.lists(CLASS, max_size=5) | st.dictionaries(st.text(max_size=3), st.text(max_size=3))),
        "bands": _maybe(
            st.lists(st.sampled_from(["red", "green", "blue", "nir", "RED", " ", ""]) | ODD_NUMBERS, max_size=5)
            | st.text(max_size=10)
        ),
        "scaling": _maybe(SCALING),
        "gsd_m": _maybe(ODD_NUMBERS),
        "gsd_range_m": _maybe(st.lists(ODD_NUMBERS, max_size=3)),
        "architecture": _maybe(
            st.fixed_dictionaries({}, optional={"name": _maybe(st.sampled_from(["geoseg.unet", "smp.Unet"])), "args": YAMLISH})
            | st.lists(st.text(max_size=3), max_size=2)
        ),
        "tile": _maybe(ODD_NUMBERS),
        "halo": _maybe(ODD_NUMBERS),
        "size_multiple": _maybe(ODD_NUMBERS),
        "activation": _maybe(st.sampled_from(["auto", "softmax", "sigmoid", "none", "relu"])),
        "metrics": YAMLISH,
        "training": YAMLISH,
    },
).flatmap(lambda d: st.fixed_dictionaries({k: st.just(v) for k, v in d.items()}, optional={"unknown": YAMLISH, 7: YAMLISH}))

ORIGIN = "/models/m.card.json"


@settings(max_examples=300, **SETTINGS)
@given(d=YAMLISH)
def test_card_from_arbitrary_values(d: Any) -> None:
    _check_card(lambda: card_from_dict(d, ORIGIN), ORIGIN, "card arbitrary")


@settings(max_examples=500, **SETTINGS)
@given(d=CARD)
def test_card_from_plausible_dicts(d: dict[Any, Any]) -> None:
    _check_card(lambda: card_from_dict(d, ORIGIN), ORIGIN, "card plausible")


def _card_text(draw: st.DrawFn, as_yaml: bool) -> str:
    how = draw(st.sampled_from(["dump", "dump", "text", "tokens"]))
    if how == "text":
        return draw(st.text(max_size=200))
    if how == "tokens":
        toks = ['{"', '"', ":", ",", "[", "]", "{", "}", "1e999", "NaN", "-Infinity", "9" * 400, "\\ud800", "null", "\n"]
        if as_yaml:
            toks += ["!!python/object:os.system ", "&a ", "*a", "2024-02-30", "!!int x", "!!float y", "!!binary ~", "- ", "a: "]
        return "".join(draw(st.lists(st.sampled_from(toks), max_size=30)))
    d = draw(st.one_of(CARD, JSONISH))
    if as_yaml:
        return yaml.safe_dump(d, allow_unicode=True)
    return json.dumps(d, default=str)


@st.composite
def card_texts(draw: st.DrawFn) -> tuple[str, str]:
    ext = draw(st.sampled_from([".card.json", ".card.yaml", ".card.yml"]))
    return ext, _card_text(draw, ext != ".card.json")


@settings(max_examples=300, **SETTINGS)
@given(item=card_texts())
def test_card_text(item: tuple[str, str]) -> None:
    ext, text = item
    origin = "/models/m" + ext
    _check_card(lambda: card_from_dict(card_sources.load_text(text, origin), origin), origin, "card text")


@settings(max_examples=300, **SETTINGS)
@given(item=card_texts(), raw=st.none() | st.binary(max_size=100))
def test_find_card_sidecar(folder: Path, item: tuple[str, str], raw: bytes | None) -> None:
    ext, text = item
    model = folder / "model.pt"
    model.write_bytes(b"not a zip")
    for old in folder.glob("model.card.*"):
        old.unlink()
    side = folder / f"model{ext}"
    if raw is not None:
        side.write_bytes(raw)
    else:
        side.write_text(text, encoding="utf-8", errors="surrogatepass")
    _check_card(lambda: find_card(str(model), "torchscript"), str(side), "find_card sidecar")


DEEPNESS_KEYS = [
    "class_names",
    "resolution",
    "tiles_size",
    "tiles_overlap",
    "standardization_mean",
    "standardization_std",
    "model_type",
    "det_type",
    "det_conf",
    "det_iou_thresh",
    "seg_thresh",
]
DEEPNESS_VALUES = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["1e999", "inf", "nan", "-1", "0", "9" * 400, "[1, 2]", "{'0': 'a', 'x': 'b'}", "{1: 2}", "((((", "[" * 200]),
    st.sampled_from(['"Detector"', "Segmentor", '"YOLO_v6"', "YOLO_Ultralytics_obb", "0.5", "1.5", '{"0": "car"}']),
    JSONISH.map(lambda v: json.dumps(v)),
)


@settings(max_examples=200, **SETTINGS)
@given(meta=st.dictionaries(st.sampled_from(DEEPNESS_KEYS), DEEPNESS_VALUES, max_size=6))
def test_find_card_deepness_metadata(folder: Path, meta: dict[str, str]) -> None:
    (folder / "onnx").mkdir(exist_ok=True)
    model = folder / "onnx" / "model.onnx"
    model.write_bytes(b"")
    with mock.patch.object(card_sources, "onnx_metadata", return_value=meta):
        _check_card(lambda: find_card(str(model), "onnx"), str(model), "find_card deepness")


# ---------------------------------------------------------------- outputs.folder stays inside the project

RULE = """name: t
imagery: [scene.tif]
models: [forest]
outputs:
  formats: [gpkg]
  folder: {folder}
"""


def test_output_folder_inside_the_project_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "workflows").mkdir()
    for sub, folder, expect in [
        (".", "out", tmp_path / "out"),
        (".", "a/../b", tmp_path / "b"),
        ("workflows", "../out", tmp_path / "out"),  # workflows/ files may write beside their folder
        ("workflows", "out", tmp_path / "workflows" / "out"),
        ("workflows", str(tmp_path / "abs"), tmp_path / "abs"),
    ]:
        f = tmp_path / sub / "w.yaml"
        f.write_text(RULE.format(folder=folder))
        assert load_workflow(f).outputs.folder == str(expect)


def test_shipped_workflows_stay_valid() -> None:
    root = Path(__file__).resolve().parents[1]
    assert load_workflow(root / "workflows" / "sample_aoi.yaml").outputs.folder == str(root / "sample_out")
    assert load_workflow(root / "workflows" / "forest_watch.yaml").outputs.folder == str(root / "forest_watch_out")


@pytest.mark.parametrize("sub, folder", [("workflows", "../../elsewhere"), (".", "../elsewhere"), ("workflows", "/tmp/x")])
def test_output_folder_outside_the_project_is_refused(tmp_path: Path, sub: str, folder: str) -> None:
    (tmp_path / "p" / "workflows").mkdir(parents=True)
    f = tmp_path / "p" / sub / "w.yaml"
    f.write_text(RULE.format(folder=folder))
    project = tmp_path / "p"
    with pytest.raises(InputError) as err:
        load_workflow(f)
    msg = str(err.value)
    assert msg.startswith(f"{f}:6: outputs.folder {folder!r} is outside the project folder {project}"), msg
    assert msg.endswith(f"give a folder inside {project}, or pass out=") and "\n" not in msg


def test_output_folder_through_a_symlink_out_of_the_project_is_refused(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "p" / "link").symlink_to(tmp_path / "elsewhere")
    f = tmp_path / "p" / "w.yaml"
    f.write_text(RULE.format(folder="link/out"))
    with pytest.raises(
        InputError, match=rf"w.yaml:6: outputs.folder 'link/out' is outside .* resolves to {tmp_path}/elsewhere/out"
    ):
        load_workflow(f)
    (tmp_path / "p" / "inner").mkdir()
    (tmp_path / "p" / "link").unlink()
    (tmp_path / "p" / "link").symlink_to(tmp_path / "p" / "inner")  # a link that stays inside is fine
    assert load_workflow(f).outputs.folder == str(tmp_path / "p" / "link" / "out")


def test_cli_out_is_not_subject_to_the_rule(tmp_path: Path) -> None:
    """``--out`` (``out=``) replaces the file's folder and may lie anywhere; the file's own value is still resolved."""
    (tmp_path / "p").mkdir()
    f = tmp_path / "p" / "w.yaml"
    f.write_text(RULE.format(folder="../../elsewhere"))
    with pytest.raises(InputError, match="outside the project folder"):
        load_workflow(f)
    assert load_workflow(f, out=tmp_path / "anywhere").outputs.folder == str(tmp_path / "anywhere")
    f.write_text(RULE.format(folder='"\\0"'))
    with pytest.raises(InputError, match=r"w.yaml:6: outputs.folder: a path cannot contain a NUL character"):
        load_workflow(f, out=tmp_path / "anywhere")
