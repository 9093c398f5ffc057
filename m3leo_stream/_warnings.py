"""The dependencies' warnings and notices known to be harmless for these entry points, silenced in one place.

Each filter names the message, the category and the module that issues it, so that any other warning still shows.
The entry points call :func:`quiet_dependencies` unless run verbose (training: ``-v`` / ``verbose=true``; any
entry point: ``HYDRA_FULL_ERROR=1``).
"""

from __future__ import annotations

import logging
import warnings

# (message regex, category, issuing module regex, why it is harmless here)
_FILTERS: tuple[tuple[str, type[Warning], str, str], ...] = (
    (r"'set_vital' is deprecated", UserWarning, r"torchdata\.stateful_dataloader",
     "torchdata calls a torch API that torch deprecated; nothing to change on our side"),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\.pytorch\.utilities\._pytree",
     "Lightning's pytree helper builds torch's deprecated LeafSpec"),
    (r"The number of training batches \(\d+\) is smaller than the logging interval", Warning,
     r"lightning\.pytorch\.loops\.fit_loop",
     "short epochs: steps are counted over the run (max_steps), so logging still happens every log_every_n_steps"),
    (r"The `srun` command is available on your system but is not used", Warning,
     r"lightning\.fabric\.plugins\.environments\.slurm",
     "a login node or a single-process run on a Slurm cluster; the sbatch scripts launch ranks with srun"),
    (r"Experiment logs directory .* exists and is not empty", Warning, r"lightning\.fabric\.loggers\.csv_logs",
     "a resumed run (W&B disabled) goes on in its own CSV directory, and Lightning appends to metrics.csv"),
)
_NOTICES = ("💡 Tip: For seamless cloud logging",)  # Lightning's advertisement, logged at INFO on every fit


class _DropNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_NOTICES)


def quiet_dependencies() -> None:
    """Install the filters (idempotent)."""
    for message, category, module, _why in _FILTERS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotices) for f in logger.filters):
            logger.addFilter(_DropNotices())
