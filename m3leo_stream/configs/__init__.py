"""The Hydra configs of the entry points (``train.yaml``, ``embed.yaml``, ``shift.yaml`` and their groups), shipped
inside the package so that any install can run them.

Own config directories join them through Hydra's search path: ``--config-dir DIR`` or
``hydra.searchpath=[file:///abs/DIR]`` on the command line; ``DIR/experiment/mine.yaml`` is then ``experiment=mine``.
"""

from pathlib import Path

CONFIG_DIR = str(Path(__file__).resolve().parent)
"""This directory: the ``config_path`` of the entry points and the ``config_dir`` of ``hydra.initialize_config_dir``."""
