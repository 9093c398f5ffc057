"""The dataset card states every modality's encodings, units and scale, with the counts of this build."""

from __future__ import annotations

import json

from shard_tools.cli import main as cli_main


def test_card_states_encodings_and_units(small_shards, capsys):
    assert cli_main(["card", str(small_shards)]) == 0
    capsys.readouterr()
    text = (small_shards / "README.md").read_text()
    manifest = json.loads((small_shards / "manifest.json").read_text())
    n_s1 = manifest["source_encodings"]["s1grd"]["geetiles-2023-uint16"]
    assert n_s1 == manifest["members"]["s1grd"]
    assert "`geetiles-2023-uint16` (uint16)" in text and f"**{n_s1} members in this build.**" in text
    assert "rramosp/geetiles@7beae01" in text and "sartiles" in text
    assert "| `winter_vv_asc` | int16 | dB | 0.01 |" in text
    assert "| `01_red` | uint8 | reflectance | 0.001176 |" in text
    assert "| `coherence_winter_12` | float32 | 1 | 0.01 | coherence |" in text
    assert "| `slope` | int16 | deg | 1 |" in text
    assert "Physical value = stored value × the band's scale" in text
