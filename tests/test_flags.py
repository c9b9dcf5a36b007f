"""Library messages name API keywords; the command line shows its own flags."""

from __future__ import annotations

import pytest

from geoseg.commands.flags import as_flags


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
