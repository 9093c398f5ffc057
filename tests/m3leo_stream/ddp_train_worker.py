"""One rank of a real two-process (gloo) training run of a shipped experiment; launched by test_train_ddp.py.

Runs ``m3leo_stream.train.run`` on the Hydra overrides given on the command line, with one extra callback that
writes ``<out>/rank<r>.json``: the global step, and per parameter a digest of its final values (to compare across
ranks), whether it ever had a gradient and whether its values are finite.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import lightning.pytorch as pl
from hydra import compose, initialize_config_dir

from m3leo_stream import train


class ParameterDigest(pl.Callback):
    def __init__(self, out: str):
        self.out = out
        self.had_grad: set[str] = set()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.had_grad |= {n for n, p in pl_module.named_parameters() if p.grad is not None}

    def on_train_end(self, trainer, pl_module) -> None:
        params = {n: hashlib.sha256(p.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
                  for n, p in pl_module.named_parameters()}
        trainable = [n for n, p in pl_module.named_parameters() if p.requires_grad]
        with open(os.path.join(self.out, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump({"global_step": trainer.global_step, "world_size": trainer.world_size, "params": params,
                       "no_grad": sorted(set(trainable) - self.had_grad),
                       "nonfinite": [n for n, p in pl_module.named_parameters() if not p.detach().isfinite().all()],
                       "strategy": type(trainer.strategy).__name__}, f)


def main() -> None:
    out, overrides = sys.argv[1], sys.argv[2:]
    build = train.build_callbacks

    def with_digest(cfg):
        cbs, best = build(cfg)
        return [*cbs, ParameterDigest(out)], best

    train.build_callbacks = with_digest
    with initialize_config_dir(train.CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides)
    train.run(cfg)


if __name__ == "__main__":
    main()
