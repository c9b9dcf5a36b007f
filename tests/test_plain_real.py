"""Real plain images (../shared/data/plain): the fundus photograph tiled end to end."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import whole_image_reference


def test_fundus_vessels_tiled_equal_whole_image(shared_data, tmp_path) -> None:
    """The 1411 px retina in 256 px tiles on 512 px chunks: mask == the rule run once on the whole photo."""
    import rasterio
    from PIL import Image

    import geoseg
    from geoseg.models.indices import DarkLines

    image = shared_data / "plain" / "retina" / "retina.jpg"
    if not image.exists():
        pytest.skip(f"{image} is absent")
    with pytest.warns(geoseg.NotGeoreferencedWarning), geoseg.scheduler("threads"):
        mask = geoseg.predict(str(image), "vessels", tile=256, halo=16, chunk=512)
        geoseg.write(mask, tmp_path)
    with rasterio.open(image) as ds:  # GDAL's JPEG decoder, as the engine reads it (Pillow's differs by a few levels)
        rgb = ds.read()
    ref = whole_image_reference(DarkLines(11, 0.07).eval(), rgb.astype(np.float32), 16)
    with rasterio.open(tmp_path / "mask.tif") as ds:
        assert ds.crs is None and (ds.width, ds.height) == (rgb.shape[2], rgb.shape[1])
        got = ds.read(1)
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "mask.png")), got)
    share = float(np.mean(got == 1))
    assert 0.04 < share < 0.15, f"vessel share {share:.3f} is not what a fundus photograph holds"
