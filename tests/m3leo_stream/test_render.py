"""Pictures of chips: every modality draws as something visible, land cover in its legend's colours, no data in
its own colour, stored and physical units alike; a chip's figure and PNG at the size asked for."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from m3leo_stream import render
from m3leo_stream.datamodule import M3LEODataModule
from m3leo_stream.modalities import (
    BANDS_KEY,
    REGISTRY,
    Display,
    Modality,
    Registry,
    load_user_modalities,
    polarisation_pairs,
)
from m3leo_stream.shard_root import ShardRoot


def _distinct(img: np.ndarray) -> int:
    return len(np.unique(img.reshape(-1, img.shape[-1]), axis=0))


def _visible(img: np.ndarray) -> None:
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[-1] in (3, 4)
    assert img.std() > 0 and _distinct(img) >= 5


@pytest.fixture(scope="module")
def chip(small_shards):
    root = ShardRoot(str(small_shards))
    key = root.read_index(["key"]).column("key")[0].as_py()
    return root, key, root.read_sample(key)


def test_every_builtin_modality_of_a_generated_chip_draws_as_a_picture(chip):
    root, key, sample = chip
    assert sample["key"] == key and {"region", "split", "shard", "lon", "lat", "json"} <= set(sample)
    drawn = [n for n in root.modalities if n in sample]
    assert {"s1grd", "s2rgbm", "esawc", "biomass", "srtmdem"} <= set(drawn)
    for name in drawn:
        m = root.modality(name)
        img = render.picture(m, sample[name])
        assert img.shape == (m.canonical_px, m.canonical_px, 3), name
        _visible(img)


def test_land_cover_is_drawn_in_the_worldcover_legend(chip):
    _, _, sample = chip
    m = REGISTRY["esawc"]
    codes = sample["esawc"].copy()
    codes[0, :3, :3] = 0  # no data
    img = render.picture(m, codes)
    palette = render.class_palette(m)
    assert palette[m.class_codes.index(80)].tolist() == [0x00, 0x64, 0xc8]  # permanent water bodies
    assert palette[m.class_codes.index(10)].tolist() == [0x00, 0x64, 0x00]  # tree cover
    for code in np.unique(codes[codes > 0]):
        assert (img[codes[0] == code] == palette[m.class_codes.index(int(code))]).all(), code
    assert (img[:3, :3] == render.NODATA_RGB).all()
    assert _distinct(img) == len(np.unique(codes))


def test_true_colour_takes_the_median_of_the_months_with_data():
    m = REGISTRY["s2rgbm"]
    a = np.zeros(m.shape, np.uint8)  # 0: no clear scene
    jan, feb, mar = (m.band_index([f"{mo}_red", f"{mo}_green", f"{mo}_blue"]) for mo in ("01", "02", "03"))
    a[jan, :, :8] = np.array([200, 40, 40], np.uint8)[:, None, None]  # a red left half in January
    a[feb, :, 8:16] = np.array([40, 200, 40], np.uint8)[:, None, None]  # a green band in February only
    a[mar, :, :8] = np.array([200, 40, 40], np.uint8)[:, None, None]
    a[feb, :, :8] = np.array([40, 40, 200], np.uint8)[:, None, None]  # a blue outlier month on the left
    a[jan[0], 0, 0] = 0  # one month partly missing: that triple does not count there
    img = render.picture(m, a)
    left, middle, rest = img[1:, :8], img[:, 8:16], img[:, 16:]
    assert (left[..., 0] > left[..., 2]).all()  # red (2 of 3 months) wins over the blue outlier
    assert (middle[..., 1] > middle[..., 0]).all()  # the only month with data
    assert (rest == render.NODATA_RGB).all()


def test_sar_false_colour_from_vv_and_vh_in_stored_or_physical_units():
    m = REGISTRY["s1grd"]
    a = np.full(m.shape, m.nodata, np.int16)
    vv, vh = m.band_index(["summer_vv_asc", "summer_vh_asc"])
    grid = np.linspace(-2000, -500, m.canonical_px, dtype=np.float32)  # -20 .. -5 dB, in 0.01 dB
    a[vv] = grid[None, :].astype(np.int16)  # VV grows to the right
    a[vh] = (grid[:, None] - 700).astype(np.int16)  # VH grows downwards
    a[:, :5, :5] = m.nodata
    img = render.picture(m, a)
    assert (img[:5, :5] == render.NODATA_RGB).all()
    assert img[200, 400, 0] > img[200, 50, 0] and img[400, 200, 1] > img[50, 200, 1]  # R = VV, G = VH
    scale = np.asarray(m.scale, np.float32)[:, None, None]
    phys = np.where(m.is_nodata(a), np.nan, a * scale)
    assert (render.picture(m, phys, units="physical") == img).all()
    sub = m.band_index(["summer_vv_asc", "summer_vh_asc"])  # a subset of bands, named
    assert (render.picture(m, a[sub], bands=["summer_vv_asc", "summer_vh_asc"]) == img).all()
    assert polarisation_pairs(m, ["summer_vv_asc", "summer_vh_asc", "summer_vv-vh_asc"]) == [(0, 1)]


def test_continuous_bands_use_their_colormap_range_and_mark_special_values():
    m = REGISTRY["modisveg"]
    a = np.tile(np.arange(0, 101, 5, dtype=np.uint8), (21, 1))[None]
    a[0, 0, :4] = 200  # water
    a[0, 1, :4] = m.nodata
    img = render.picture(m, a)
    assert (img[0, :4] == render.SPECIAL_RGB).all() and (img[1, :4] == render.NODATA_RGB).all()
    import matplotlib

    greens = matplotlib.colormaps["Greens"]
    assert img[5, -1].tolist() == [int(v * 255 + 0.5) for v in greens(1.0)[:3]]  # 100 % = the top of 0..100
    assert img[5, 0].tolist() == [int(v * 255 + 0.5) for v in greens(0.0)[:3]]


def test_display_facts_are_checked_and_travel_with_the_manifest(tmp_path):
    again = Registry.from_json(REGISTRY.to_json())
    for name in REGISTRY:
        assert again[name].display == REGISTRY[name].display, name
    assert REGISTRY["s2rgbm"].display.rgb_bands[6] == ("07_red", "07_green", "07_blue")
    bare = {k: v for k, v in REGISTRY["s2rgbm"].to_json().items() if k != "display"}  # a manifest without them
    assert Modality.from_json(bare).display == REGISTRY["s2rgbm"].display
    one_month = {k: v for k, v in bare.items() if k not in ("band_kinds", "units", "scale", "file_band_names")}
    one_month["bands"] = ["07_red", "07_green", "07_blue"]  # the built-in's twelve triples do not fit
    assert Modality.from_json(one_month).display == Display()
    base = REGISTRY["esawc"].to_json()
    with pytest.raises(ValueError, match="palette has 2 colours for 11 class codes"):
        Modality.from_json({**base, "display": {"palette": ["#000000", "#ffffff"]}})
    with pytest.raises(ValueError, match="display names unknown bands"):
        Modality.from_json({**REGISTRY["biomass"].to_json(), "display": {"band": "nope"}})
    with pytest.raises(ValueError, match="not #rrggbb"):
        Display(palette=("red",))
    (tmp_path / "m.yaml").write_text("modalities:\n- {name: ndvi, bands: [ndvi], dtype: float32, kind: continuous,\n"
                                     "   resolution_m: 10, display: {colormap: RdYlGn, value_range: [-1, 1]}}\n")
    user = load_user_modalities(tmp_path / "m.yaml")["ndvi"]
    assert user.display == Display(colormap="RdYlGn", value_range=(-1.0, 1.0))
    img = render.picture(user, np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 8, 8))
    _visible(img)
    with pytest.raises(ValueError, match="unknown matplotlib colormap 'nope'"):
        render.colormap_rgb(np.zeros((2, 2)), "nope")


def test_chip_png_has_the_size_asked_for_and_is_not_blank(chip, tmp_path):
    import matplotlib.image

    root, key, _ = chip
    names = ["s2rgbm", "esawc", "biomass"]
    path = render.chip_png(root, key, tmp_path / "sub" / "chip.png", names, size=256)
    img = matplotlib.image.imread(path)
    assert img.shape[1] == 3 * (256 + 2 * render.PAD_PX)  # one row of three panels
    assert img.shape[0] >= 256 + render.TITLE_PX
    _visible((img * 255).astype(np.uint8))
    fig = render.chip_figure(root.read_sample(key), root.modalities, size=128)
    assert len(fig.axes) == len([n for n in root.modalities if n in root.read_sample(key)])
    width, height = fig.get_size_inches() * render.DPI
    assert round(width) == 3 * (128 + 2 * render.PAD_PX)  # nine modalities: three by three


def test_datamodule_plot_draws_a_key_or_a_loaded_sample_alike(small_shards):
    dm = M3LEODataModule(str(small_shards), inputs=["s1grd", "s2rgbm"], targets=["esawc"], batch_size=2,
                         num_workers=0)
    batch = next(iter(dm.train_dataloader()))
    sample = {k: v[0] for k, v in batch.items() if isinstance(v, torch.Tensor) and v.dim() > 0}
    sample[BANDS_KEY] = batch[BANDS_KEY]
    by_key = dm.plot(batch["key"][0], size=64)
    by_sample = dm.plot(sample, size=64, show_titles=False)
    assert len(by_key.axes) == len(by_sample.axes) == 3
    for a, b in zip(by_key.axes, by_sample.axes):
        assert (a.images[0].get_array() == b.images[0].get_array()).all()
    assert [ax.get_title() for ax in by_key.axes] == ["s1grd: VV, VH, VV-VH", "s2rgbm: true colour",
                                                       "esawc: landcover"]
    assert batch["key"][0] in by_key._suptitle.get_text()
    with pytest.raises(ValueError, match="not a batch"):
        dm.plot({k: v for k, v in batch.items() if k in ("s1grd", "s2rgbm")})
    with pytest.raises(KeyError, match="no sample with key 'nokey'"):
        dm.plot("nokey")


def test_training_panels_draw_land_cover_predictions_in_its_palette():
    from m3leo_stream.callbacks import ImagePanels
    from m3leo_stream.tasks import DataInfo, SegmentationTask

    m = REGISTRY["esawc"]
    info = DataInfo(in_channels={"s2rgbm": 3}, channel_names={"s2rgbm": ["07_red", "07_green", "07_blue"]},
                    region_names=["conus"], target="esawc", num_classes=len(m.class_codes),
                    class_names=list(m.class_names))
    task = SegmentationTask({"name": "unet", "width": 4, "depth": 2}, info)
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, len(m.class_codes), (1, 16, 16), generator=g)
    batch = {"s2rgbm": torch.rand(1, 3, 16, 16, generator=g) * 0.3, "esawc": y, "key": ["k0"],
             "region": torch.tensor([0]), "valid": torch.tensor([True])}
    panels = ImagePanels(max_images=1).panels(task, batch, REGISTRY)
    _, img = panels["prediction"][0]
    label = img[:, 256:]
    palette = render.class_palette(m)
    assert (label == render.upsample(palette[y[0].numpy()], 256)).all()
    _visible(panels["s2rgbm"][0][1])


@pytest.mark.parametrize("months", [1, 2, 3, 12])
def test_nan_aware_median_and_mean_agree_with_numpy(months):
    import warnings

    rng = np.random.default_rng(months)
    a = rng.normal(size=(months, 3, 20, 20)).astype(np.float32)
    a[rng.random(a.shape) < 0.5] = np.nan
    with warnings.catch_warnings():  # numpy warns of the all-NaN pixels, which stay NaN in both
        warnings.simplefilter("ignore", RuntimeWarning)
        median, mean = np.nanmedian(a, axis=0), np.nanmean(a, axis=0)
    assert np.isnan(median).any() or months > 3
    np.testing.assert_allclose(render._nan_median(a), median, rtol=1e-6, equal_nan=True)
    np.testing.assert_allclose(render._nan_mean(a), mean, rtol=1e-5, atol=1e-6, equal_nan=True)
