"""The configs' schemas (m3leo_stream/config.py): every DataModule argument is a ``data`` key that reaches the
DataModule, defaults are the code's, an unknown or misspelled key is an error naming it (also one line from the
command line), and ``--cfg job`` lists every key."""

from __future__ import annotations

import dataclasses
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from m3leo_stream.config import ConfigError, DataConfig, schema_of, validate
from m3leo_stream.datamodule import M3LEODataModule
from m3leo_stream.train import CONFIG_DIR, build_datamodule
from m3leo_stream.transforms import DEFAULT_CONFIG

REPO = Path(__file__).resolve().parents[2]
DM_PARAMS = {n: p.default for n, p in inspect.signature(M3LEODataModule.__init__).parameters.items()
             if n not in ("self", "transforms")}
SET_BY_YAML = {"root", "inputs", "optional", "seed"}  # m3leo_stream/configs/data/default.yaml


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides)


def demo(*overrides: str):
    return compose_cfg(["experiment=demo", "data.root=/x", *overrides])


def test_every_datamodule_argument_is_a_data_key_with_the_datamodules_default():
    cfg = demo()
    assert set(cfg.data) == set(DM_PARAMS), set(DM_PARAMS) ^ set(cfg.data)
    base = compose_cfg(["data.root=/x"])
    for name, default in DM_PARAMS.items():
        if name not in SET_BY_YAML:
            want = list(default) if isinstance(default, tuple) else default
            assert base.data[name] == want, f"data.{name}: {base.data[name]!r}, the DataModule's default {want!r}"
    assert "transforms" in cfg and "transforms" not in cfg.data  # the DataModule's transforms: its own section


def test_data_keys_reach_the_datamodule():
    dm = build_datamodule(demo())
    rc = dm.reader_config
    assert (rc.io_threads, rc.coalesce_gap, dm.persistent_workers) == (None, 64 * 1024, True)
    dm = build_datamodule(demo("data.io_threads=2", "data.coalesce_gap=0", "data.retry={deadline: 5.0}",
                               "data.pin_memory=true", "data.persistent_workers=false", "data.splits={val: test}",
                               "data.worker_mode=process", "data.on_unreadable=substitute"))
    rc = dm.reader_config
    assert (rc.io_threads, rc.coalesce_gap, rc.retry.deadline, rc.on_unreadable) == (2, 0, 5.0, "substitute")
    assert (dm.pin_memory, dm.persistent_workers, dm.worker_mode) == (True, False, "process")
    assert dm.splits == {"train": "train", "val": "test", "test": "test"}
    assert build_datamodule(demo("++data.io_threads=3")).reader_config.io_threads == 3
    assert build_datamodule(demo("+data.storage_options.anon=true")).storage_options == {"anon": True}
    dm = build_datamodule(demo("data.region_weights={conus: 2, europe: 1}", "data.storage_options={anon: true}"))
    assert dm.region_weights == {"conus": 2, "europe": 1} and dm.storage_options == {"anon": True}


@pytest.mark.parametrize("override,key", [
    ("data.io_threadz=2", "io_threadz"),
    ("task.optimzer={lr: 1.0}", "optimzer"),
    ("task.optimizer.lrr=1.0", "lrr"),
    ("model.dimm=3", "dimm"),
    ("trainer.max_stepz=3", "max_stepz"),
    ("transforms.grid.sise=3", "sise"),
    ("checkpoint.monitr=x", "monitr"),
])
def test_a_misspelled_key_is_an_error_at_composition(override, key):
    with pytest.raises(ConfigCompositionException, match=key):
        demo(override)
    cfg = demo("+" + override)  # Hydra adds a key given with "+" to any section: validate finds it
    with pytest.raises(ConfigError, match=rf"config key \S*{key}:") as e:
        validate(cfg)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("override, key, value", [
    ("data.worker_mode=proces", "data.worker_mode", "proces"),  # a Literal of the DataModule's signature
    ("data.on_unreadable=skip", "data.on_unreadable", "skip"),
    ("task.optimizer.name=adamx", "task.optimizer.name", "adamx"),  # a Literal field of a task's dataclass
    ("checkpoint.mode=mx", "checkpoint.mode", "mx"),  # one_of in a schema written here
    ("matmul_precision=hgh", "matmul_precision", "hgh"),
    ("+logger.wandb.mode=onlin", "logger.wandb.mode", "onlin"),
])
def test_a_string_option_outside_its_choices_is_an_error_naming_the_key(override, key, value):
    with pytest.raises(ConfigError, match=rf"^config key {key}: '{value}' is not one of "):
        validate(demo(override))


def test_a_wrong_type_is_an_error_at_composition():
    with pytest.raises(ConfigCompositionException, match="batch_size"):
        demo("data.batch_size=eight")


def test_misspelled_keys_of_every_model_and_task_are_errors():
    for exp, model_key in [("seg_esawc_unet", "widht"), ("finetune_esawc_from_mae", "decoder_chanels"),
                           ("pretrain_mae", "mask_ration")]:
        cfg = compose_cfg([f"experiment={exp}", "data.root=/x"])
        validate(cfg)
        with pytest.raises(ConfigError, match=model_key):
            validate(compose_cfg([f"experiment={exp}", "data.root=/x", f"+model.{model_key}=1"]))
        with pytest.raises(ConfigError, match="clas_weights"):
            validate(compose_cfg([f"experiment={exp}", "data.root=/x", "+task.clas_weights=[1]"]))
    with pytest.raises(ConfigError, match="model.name"):
        validate(demo("model.name=vit"))


def test_every_experiment_validates():
    for f in sorted((REPO / "m3leo_stream" / "configs" / "experiment").glob("*.yaml")):
        validate(compose_cfg([f"experiment={f.stem}", "data.root=/x"]))


def test_the_transforms_yaml_states_the_code_defaults():
    from omegaconf import OmegaConf

    _assert_close(OmegaConf.to_container(compose_cfg(["data.root=/x"]).transforms), DEFAULT_CONFIG, "transforms")


def _assert_close(got, want, where: str) -> None:
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), f"{where}: keys {set(got) ^ set(want)}"
        for k in want:
            _assert_close(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_close(g, w, f"{where}[{i}]")
    else:
        assert got == (pytest.approx(want) if isinstance(want, float) else want), f"{where}: {got!r} != {want!r}"


def test_a_new_datamodule_argument_is_a_key_without_an_edit():
    class WithChecksums(M3LEODataModule):
        def __init__(self, *args, verify_checksums: bool = True, **kw):
            super().__init__(*args, **kw)

    fields = {f.name: f for f in dataclasses.fields(schema_of(WithChecksums, "X"))}
    assert fields["verify_checksums"].type is bool and fields["verify_checksums"].default is True
    assert {f.name for f in dataclasses.fields(DataConfig)} == set(DM_PARAMS)


def _cli(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "m3leo_stream.train", "experiment=demo", "data.root=/x", *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_cfg_job_lists_every_datamodule_argument(tmp_path):
    p = _cli(tmp_path, "--cfg", "job")
    assert p.returncode == 0, p.stderr[-2000:]
    data = yaml.safe_load(p.stdout)["data"]
    assert set(data) == set(DM_PARAMS), set(DM_PARAMS) ^ set(data)


def test_command_line_names_an_unknown_key_in_one_line(tmp_path):
    p = _cli(tmp_path, "+data.io_threadz=2")
    assert p.returncode != 0
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "data.io_threadz" in err[0] and "did you mean 'io_threads'" in err[0], p.stderr[-2000:]
