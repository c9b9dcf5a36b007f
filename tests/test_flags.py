"""Library messages name API keywords; the command line shows its own flags."""

from __future__ import annotations

import logging

import pytest

from geoseg.commands.flags import FlagsFilter, as_flags


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            "out: holds outputs; pass overwrite=True or choose another out_dir=",
            "out: holds outputs; pass --overwrite or choose another --out",
        ),
        ("ran out of memory; lower tile= (or halo=, batch_size=)", "ran out of memory; lower --tile (or --halo, --batch-size)"),
        ("give band numbers instead (bands=3,2,1)", "give band numbers instead (--bands 3,2,1)"),
        ("names need a card; band_map= needs names", "names need a card; --bands needs names"),
        ("keep the pixel size with resample=False", "keep the pixel size with --no-resample"),
        ("raise GEOSEG_MAX_PIXELS=1000 or crop", "raise GEOSEG_MAX_PIXELS=1000 or crop"),  # not an option: unchanged
        ("a path like a=b/c=d stays", "a path like a=b/c=d stays"),
        ("use num_threads=2", "use --threads 2"),
        ("or band_map={'nir': N, 'red': N}", "or --bands nir=N,red=N"),  # a dict literal: NAME=N pairs
        ("give band numbers instead (bands=[3, 2, 1])", "give band numbers instead (--bands 3,2,1)"),
        ("give bands=(...) in the model's order", "give --bands ... in the model's order"),
        ("use device='cpu' or device='auto'", "use --device cpu or --device auto"),
        ("such as label_values={0: 'membrane', 255: 'cell'} (CLASS", "such as --label-values 0=membrane,255=cell (CLASS"),
        ("train: give layers= one entry; check aois=", "train: give --layer one entry; check --aoi"),
        ("or use kind='local'", "or use --scheduler local"),
    ],
)
def test_keywords_become_flags(message: str, expected: str) -> None:
    assert as_flags(message) == expected


def test_the_running_command_wins() -> None:
    """``geoseg change`` has --bands-before; predict's --bands stays predict's."""
    from geoseg.commands import change, predict

    assert as_flags("fix bands_before=", change) == "fix --bands-before"
    assert as_flags("fix bands=", predict) == "fix --bands"


def test_a_library_error_reaches_the_terminal_as_flags(tmp_path) -> None:
    """The CLI's one-line error translates: an existing output folder asks for --overwrite, not overwrite=True."""
    from click.testing import CliRunner

    from geoseg.cli import main
    from geoseg.sample import make_sample

    make_sample(str(tmp_path), size=128, seed=1)
    args = ["predict", str(tmp_path / "scene.tif"), "-m", "water", "-o", str(tmp_path / "o"), "--scheduler", "synchronous"]
    assert CliRunner().invoke(main, args).exit_code == 0
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 1
    assert "--overwrite" in again.output and "overwrite=True" not in again.output


def test_logged_warnings_become_flags() -> None:
    """The band-order warning of :mod:`geoseg.models.bands` names band_map={...}; the filter words it as --bands."""
    record = logging.LogRecord("geoseg", logging.WARNING, __file__, 1, "%s: or band_map={%s}", ("a.tif", "'nir': N"), None)
    assert FlagsFilter().filter(record)
    assert record.getMessage() == "a.tif: or --bands nir=N"
    plain = logging.LogRecord("geoseg", logging.INFO, __file__, 1, "%s: radiometry %s", ("a.tif", "s2"), None)
    assert FlagsFilter().filter(plain) and plain.args == ("a.tif", "s2")  # nothing to translate: left alone
