"""The registry matches DESIGN.md's table and rejects inconsistent declarations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from m3leo_stream.modalities import (
    REGISTRY,
    Modality,
    Registry,
    is_nan,
    load_user_modalities,
    nodata_mask,
    nodata_value,
    polarisation_pairs,
)

DESIGN = {  # modality: (bands, canonical px, dtype)
    "s1grd": (16, 448, "int16"), "s2rgbm": (36, 448, "uint8"), "gssic": (38, 50, "float32"),
    "gunw": (3, 50, "float32"), "esawc": (1, 448, "uint8"), "biomass": (2, 45, "float32"),
    "ghsbuilts": (1, 45, "float32"), "modisveg": (1, 18, "uint8"), "srtmdem": (2, 448, "int16"),
}


def test_registry_matches_design_table():
    assert list(REGISTRY) == list(DESIGN)
    for name, (bands, px, dtype) in DESIGN.items():
        m = REGISTRY[name]
        assert (len(m.bands), m.canonical_px, m.dtype) == (bands, px, dtype), name
        assert m.shape == (bands, px, px)
        assert len(m.band_kinds) == len(m.units) == len(m.scale) == bands


def test_band_orders():
    s1 = REGISTRY["s1grd"].bands
    assert s1[:4] == ("winter_vv_asc", "winter_vv_des", "winter_vh_asc", "winter_vh_des")
    assert s1[4 * 3 + 2 * 1 + 1] == "fall_vh_des"  # index = 4·season + 2·pol + dir
    assert REGISTRY["s2rgbm"].bands[:4] == ("01_red", "01_green", "01_blue", "02_red")
    g = REGISTRY["gssic"].bands
    assert g[0] == "amplitude_winter_vv" and "coherence_fall_48" in g and g[-2:] == ("geometry_inc", "geometry_lsmap")
    assert REGISTRY["esawc"].class_codes == (10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100)
    assert REGISTRY["gunw"].band_kinds == ("continuous", "coherence", "phase")


def test_folder_patterns_match_upstream_names():
    for folder, name in (("s1grd-2020", "s1grd"), ("s2rgbm-2019", "s2rgbm"), ("gssic", "gssic"),
                         ("gunw_2020-01-01_2020-03-31", "gunw"), ("esaworldcover-2020", "esawc"),
                         ("biomass-2018", "biomass"), ("ghsbuilts-2020", "ghsbuilts"),
                         ("ghs-built-S-2020", "ghsbuilts"), ("modis44b006veg", "modisveg"),
                         ("srtmdem", "srtmdem"), ("strmdem", "srtmdem")):
        assert REGISTRY.for_folder(folder).name == name
    for folder in ("gunw-2020-01-01_2020-03-31", "gunw-2020-01", "gunw48-2020-01"):  # spellings of the release
        assert REGISTRY.for_folder(folder).name == "gunw", folder
    assert REGISTRY.for_folder("s2srm-2020") is None  # the multispectral product: not silently taken as s2rgbm


def test_nodata_masks():
    m = REGISTRY["biomass"]
    a = np.array([[[1.0, np.nan]]], np.float32)
    assert m.is_nodata(a).tolist() == [[[False, True]]]
    e = REGISTRY["esawc"]
    assert e.is_nodata(np.array([[[0, 10]]], np.uint8)).tolist() == [[[True, False]]]


def test_nodata_value_mask_and_nan():
    assert nodata_value(None) is None and nodata_value(float("nan")) is None
    assert nodata_value(-9999.0) == -9999.0 and nodata_value(0) == 0
    assert is_nan(float("nan")) and not is_nan(0) and not is_nan(None) and not is_nan("nan")
    f = np.array([np.nan, -9999.0, 3.0], np.float32)
    assert nodata_mask(f, -9999.0).tolist() == [True, True, False]  # NaN is no data in any float array
    assert nodata_mask(f, float("nan")).tolist() == [True, False, False]
    assert nodata_mask(f, None).tolist() == [True, False, False]
    i = np.array([0, 255, 7], np.uint8)
    assert nodata_mask(i, 255).tolist() == [False, True, False]
    assert nodata_mask(i, None).tolist() == [False, False, False]
    assert nodata_mask(i, float("nan")).tolist() == [False, False, False]


def test_manifest_round_trip():
    again = Registry.from_json(REGISTRY.to_json())
    for name in REGISTRY:
        a, b = REGISTRY[name], again[name]
        assert a.bands == b.bands and a.dtype == b.dtype and a.canonical_px == b.canonical_px
        assert (a.nodata == b.nodata) or (math.isnan(a.nodata) and math.isnan(b.nodata))
        assert a.nc_variables == b.nc_variables and a.special_values == b.special_values
        assert [e.to_json() for e in a.encodings] == [e.to_json() for e in b.encodings]


def test_polarisation_pairs_are_declared_on_the_sar_modalities():
    s1, g = REGISTRY["s1grd"], REGISTRY["gssic"]
    assert s1.polarisation_pairs[0] == ("winter_vv_asc", "winter_vh_asc") and len(s1.polarisation_pairs) == 8
    assert g.polarisation_pairs == tuple((f"amplitude_{s}_vv", f"amplitude_{s}_vh")
                                         for s in ("winter", "spring", "summer", "fall"))
    assert polarisation_pairs(REGISTRY["s2rgbm"]) == [] and polarisation_pairs(g)[0] == (0, 1)
    # positions in a list of channel names: only pairs with both bands there, in the VV band's order
    names = ["summer_vh_des", "x", "summer_vv_asc", "summer_vv_des", "summer_vh_asc", "fall_vv_asc"]
    assert polarisation_pairs(s1, names) == [(2, 4), (3, 0)]
    # an entry without declared pairs (a manifest written before they were declared, a user YAML) pairs by name
    old = {k: v for k, v in s1.to_json().items() if k != "polarisation_pairs"}
    assert Modality.from_json(old).polarisation_pairs == s1.polarisation_pairs
    base = dict(name="x", folder_pattern="x", file_ext="tif", bands=("co", "cross", "y_vv"), dtype="int16",
                kind="sar_db", resolution_m=10, description="", source="")
    assert Modality(**base).polarisation_pairs == ()  # y_vv has no y_vh
    m = Modality(**base, polarisation_pairs=(("co", "cross"),))
    assert Modality.from_json(m.to_json()).polarisation_pairs == (("co", "cross"),)
    with pytest.raises(ValueError, match=r"polarisation_pairs must pair distinct bands .*unknown: \['hv'\]"):
        Modality(**base, polarisation_pairs=(("co", "hv"),))
    with pytest.raises(ValueError, match="polarisation_pairs must pair distinct bands"):
        Modality(**base, polarisation_pairs=(("co", "cross"), ("cross", "y_vv")))


def test_source_encodings_follow_the_exporters():
    s1 = REGISTRY["s1grd"]
    enc = s1.encoding_for("uint16")
    assert enc.name == "geetiles-2023-uint16" and enc.view == "int16" and enc.nodata == 0
    wrapped = np.array([65521, 0, 3], np.uint16)  # -15 dB, no data, +3 dB
    assert (wrapped.view(enc.view) * enc.gain * s1.scale[0]).tolist() == [-15.0, 0.0, 3.0]
    u8 = s1.encoding_for("uint8")
    assert (255 * u8.gain + u8.offset) * s1.scale[0] == pytest.approx(0.0)  # DN 255 -> 0 dB, DN 0 -> -30 dB
    assert u8.offset * s1.scale[0] == pytest.approx(-30.0)
    assert REGISTRY["s2rgbm"].scale[0] * 255 == pytest.approx(0.3) and REGISTRY["s2rgbm"].nodata == 0
    g = REGISTRY["gssic"]
    coh = g.bands.index("coherence_winter_12")
    assert g.scale[coh] == 0.01 and g.band_kinds[g.bands.index("geometry_lsmap")] == "categorical"
    assert REGISTRY["srtmdem"].encoding_for("uint16").view == "int16"
    assert REGISTRY["esawc"].encoding_for("uint8").name == "as stored"
    assert REGISTRY["esawc"].encoding_for("float32") is None  # nothing maps a float onto class codes
    assert REGISTRY["ghsbuilts"].encoding_for("uint16").nodata == 65535


def test_inconsistent_declarations_are_rejected():
    base = dict(name="x", folder_pattern="x", file_ext="tif", bands=("a", "b"), dtype="uint8", kind="continuous",
                resolution_m=10, description="", source="")
    with pytest.raises(ValueError, match="units has 1 entries for 2 bands"):
        Modality(**{**base, "units": ("m",)})
    with pytest.raises(ValueError, match="unknown kind"):
        Modality(**{**base, "kind": "radar"})
    with pytest.raises(ValueError, match="need class_codes"):
        Modality(**{**base, "kind": "categorical"})
    with pytest.raises(ValueError, match="no dots"):
        Modality(**{**base, "name": "s2.l2a"})
    with pytest.raises(ValueError, match="not one of"):
        Modality(**{**base, "name": "json"})
    with pytest.raises(KeyError, match="has no band 'c'"):
        Modality(**base).band_index(["c"])
    with pytest.raises(KeyError, match="unknown modality 'nope'"):
        REGISTRY["nope"]


def test_user_yaml_extends_and_overrides(tmp_path):
    y = tmp_path / "m.yaml"
    y.write_text("""
modalities:
  - name: floodlabel
    bands: [water]
    dtype: int16
    kind: categorical
    nodata: -1
    class_codes: [0, 1]
    resolution_m: 10
  - name: s1grd
    bands: [vv, vh]
    dtype: float32
    kind: sar_db
    nodata: nan
    resolution_m: 10
    folder_pattern: 's1grd-(?P<year>\\d{4})'
""")
    reg = load_user_modalities(y)
    assert reg["floodlabel"].user_declared and reg["floodlabel"].shape == (1, 448, 448)
    assert reg["s1grd"].bands == ("vv", "vh") and math.isnan(reg["s1grd"].nodata)
    assert list(reg)[-1] == "floodlabel"
    bad = tmp_path / "bad.yaml"
    bad.write_text("modalities:\n  - name: thing\n    bands: [a]\n")
    with pytest.raises(ValueError, match="thing.*lacks dtype, kind, resolution_m"):
        load_user_modalities(bad)


def test_short_reprs_name_what_the_object_is():
    from m3leo_stream.datamodule import M3LEODataModule
    from m3leo_stream.shard_root import ShardRoot

    assert repr(REGISTRY["s1grd"]) == "Modality('s1grd': 16 bands int16 448 px, sar_db)"
    assert repr(Registry([REGISTRY["esawc"], REGISTRY["biomass"]])) == "Registry(esawc, biomass)"
    assert repr(ShardRoot("/data/m3leo")) == "ShardRoot('/data/m3leo')"
    dm = M3LEODataModule("/data/m3leo", inputs=["s1grd"], targets=["esawc"], batch_size=4)
    assert repr(dm) == "M3LEODataModule('/data/m3leo', inputs=['s1grd'], targets=['esawc'], batch_size=4)"
