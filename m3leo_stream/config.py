"""The training config's schema: structured configs (dataclasses) registered with Hydra's ConfigStore.

Composition checks every key and type against them: an unknown or misspelled key is an error that names it. Where a
section is the arguments of one class (``data``: :class:`M3LEODataModule`, ``model``: the models, ``task``: the
tasks, ``trainer``: Lightning's ``Trainer``), its schema is derived from that class's signature by
:func:`schema_of`, so the signature states the defaults and a new argument is a config key without an edit here. The
YAML files in ``m3leo_stream/configs/`` set what the training runs use where that differs; ``--cfg job`` prints every
key.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING as _NO_DEFAULT
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
from hydra.core.config_store import ConfigStore
from hydra.utils import get_class
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from m3leo_stream.datamodule import M3LEODataModule
from m3leo_stream.models import MAESegmentation, MultiModalMAE, UNet
from m3leo_stream.tasks import PretrainTask, RegressionTask, SegmentationTask
from m3leo_stream.transforms import DEFAULT_CONFIG

__all__ = ["ConfigError", "DataConfig", "TrainConfig", "TrainerConfig", "WandbMode", "plain", "register",
           "schema_of", "validate"]

_PRIMITIVE = (int, float, bool, str)


def _field_type(t: Any) -> Any:
    """``t`` as a type OmegaConf validates: optional primitives, lists, string-keyed dicts and dataclasses kept
    (sequences as lists, mappings as dicts, a ``Literal`` of strings as ``str``), an optional dict and anything else
    ``Any``."""
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        inner = _field_type(rest[0]) if len(rest) == 1 else Any
        if typing.get_origin(inner) is dict:  # OmegaConf 2.3 cannot merge a dict into an Optional[Dict] None
            return Any
        return Optional[inner] if len(rest) < len(args) and inner is not Any else inner
    if origin is Literal:
        return str if all(isinstance(a, str) for a in args) else Any
    if origin in (list, tuple, Sequence, typing.Sequence) or t in (list, tuple):
        item = args[0] if args and (origin is not tuple or len(set(args) - {Ellipsis}) == 1) else Any
        return list[_field_type(item)]  # type: ignore[misc]
    if origin in (dict, Mapping, typing.Mapping) or t in (dict,):
        return dict[str, _field_type(args[1]) if args else Any]  # type: ignore[misc]
    if isinstance(t, type) and dataclasses.is_dataclass(t):
        return schema_of(t, t.__name__)
    return t if t in _PRIMITIVE or t is Any else Any


WandbMode = Literal["online", "offline", "disabled", "shared"]
"""``logger.wandb.mode`` (and ``WANDB_MODE``): the modes W&B runs in."""

CHOICES = "choices"
"""A schema field's metadata key: the strings its value may be (OmegaConf 2.3 refuses ``Literal`` annotations, so
the schema says ``str`` and :func:`validate` checks the value against these)."""


def _choices(t: Any) -> tuple[str, ...]:
    """The strings a ``Literal`` of strings (or an optional one) allows; ``()`` for any other type."""
    args = typing.get_args(t)
    if typing.get_origin(t) in (Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return _choices(rest[0]) if len(rest) == 1 else ()
    return args if typing.get_origin(t) is Literal and all(isinstance(a, str) for a in args) else ()


def one_of(*choices: str, default: Any = MISSING) -> Any:
    """A schema field whose value is one of ``choices`` (or null where the field is optional)."""
    return dataclasses.field(default=default, metadata={CHOICES: choices})


def _field(default: Any, choices: tuple[str, ...] = ()) -> Any:
    """A dataclass field with ``default`` (``???`` for none; a copy per instance for lists, dicts, dataclasses),
    its value one of ``choices`` when there are any."""
    meta = {CHOICES: choices} if choices else {}
    if default is inspect.Parameter.empty:
        return dataclasses.field(default=MISSING, metadata=meta)
    if dataclasses.is_dataclass(default) and not isinstance(default, type):
        node, values = _field_type(type(default)), dataclasses.asdict(default)
        return dataclasses.field(default_factory=lambda: node(**values), metadata=meta)
    if isinstance(default, (list, tuple)):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    if isinstance(default, dict):
        return dataclasses.field(default_factory=lambda: dict(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _parameters(obj: Any) -> list[tuple[str, Any]]:
    """(name, default or ``inspect.Parameter.empty``) of a dataclass's fields or a callable's named parameters."""
    if not dataclasses.is_dataclass(obj):
        return [(p.name, p.default) for p in inspect.signature(obj).parameters.values()
                if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    out = []
    for f in dataclasses.fields(obj):
        if f.default is not _NO_DEFAULT:
            out.append((f.name, f.default))
        elif f.default_factory is not _NO_DEFAULT:
            out.append((f.name, f.default_factory()))
        else:
            out.append((f.name, inspect.Parameter.empty))
    return out


_schemas: dict[Any, type] = {}


def schema_of(obj: Callable[..., Any], name: str | None = None, *, exclude: Sequence[str] = (),
              extra: Sequence[tuple[str, Any, Any]] = ()) -> type:
    """A dataclass with one field per parameter of ``obj`` (a class's ``__init__``, a function or a dataclass)
    but ``exclude``: its type (see :func:`_field_type`) and default, a required one ``???``. ``extra``: more
    ``(name, type, default)`` fields, first."""
    key = (obj, name, tuple(exclude), tuple(extra))
    if key in _schemas:
        return _schemas[key]
    fn = obj.__init__ if inspect.isclass(obj) and not dataclasses.is_dataclass(obj) else obj
    hints = typing.get_type_hints(fn)
    fields = [(n, t, dataclasses.field(default=d)) for n, t, d in extra]
    for arg, default in _parameters(obj if dataclasses.is_dataclass(obj) else fn):
        if arg not in ("self", *exclude):
            hint = hints.get(arg, Any)
            fields.append((arg, _field_type(hint), _field(default, _choices(hint))))
    cls = dataclasses.make_dataclass(name or f"{obj.__name__}Config", fields)
    cls.__module__ = __name__
    _schemas[key] = cls
    return cls


def _target(cls: type) -> tuple[str, type, str]:
    return ("_target_", str, f"{cls.__module__}.{cls.__qualname__}")


# --- the sections --------------------------------------------------------------------------------------------------

DataConfig = schema_of(M3LEODataModule, "DataConfig", exclude=("transforms",))
"""``data``: every argument of :class:`M3LEODataModule` but ``transforms`` (the ``transforms`` section)."""

TrainerConfig = schema_of(pl.Trainer, "TrainerConfig", exclude=("logger", "callbacks", "plugins", "default_root_dir"))
"""``trainer``: Lightning's ``Trainer`` arguments but those ``train.run`` sets (logger, callbacks, plugins, root
directory)."""

MODELS: dict[str, type] = {
    "mae": schema_of(MultiModalMAE, "MAEConfig", exclude=("in_channels",), extra=[("name", str, "mae")]),
    "unet": schema_of(UNet, "UNetConfig", exclude=("in_channels", "out_channels"), extra=[("name", str, "unet")]),
    "mae_seg": schema_of(MAESegmentation, "MAESegConfig", exclude=("encoder", "num_classes", "input_size",
                                                                    "output_size"),
                         extra=[("name", str, "mae_seg"), ("encoder", Optional[str], None),
                                ("encoder_config", Any, None)]),
}
"""``model``, by ``name``: the model class's arguments but those the task derives from the data; ``mae_seg`` loads
its encoder from ``encoder`` (``encoder.pt`` or a pretraining checkpoint) or builds it from ``encoder_config``."""


def task_schema(cls: type) -> type:
    """``task`` for the task class ``cls``: its ``_target_`` and arguments but ``model`` (the ``model`` section),
    ``data_info`` and ``seed`` (set by ``train``)."""
    return schema_of(cls, f"{cls.__name__}Config", exclude=("model", "data_info", "seed"), extra=[_target(cls)])


TASKS: dict[str, type] = {"pretrain": task_schema(PretrainTask), "segmentation": task_schema(SegmentationTask),
                          "regression": task_schema(RegressionTask)}


def _schema_of_dict(name: str, d: Mapping[str, Any], open_keys: Sequence[str] = ()) -> type:
    """A dataclass of the keys of ``d`` (nested dicts: nested dataclasses), values of any type, ``d``'s values as
    defaults; the dicts at ``open_keys`` (dotted) take any keys."""
    fields: list[tuple[str, Any, Any]] = []
    for k, v in d.items():
        if k in open_keys or not isinstance(v, Mapping):
            fields.append((k, dict[str, Any] if isinstance(v, Mapping) else Any, _field(v)))
        else:
            sub = _schema_of_dict(f"{name}_{k}", v, [o.split(".", 1)[1] for o in open_keys if o.startswith(k + ".")])
            fields.append((k, sub, dataclasses.field(default_factory=sub)))
    return dataclasses.make_dataclass(name, fields)


TransformsConfig = _schema_of_dict("TransformsConfig", DEFAULT_CONFIG, ["modalities", "kinds.categorical"])
"""``transforms``: the keys of :data:`transforms.DEFAULT_CONFIG` (its values the defaults); ``modalities``
takes per-modality overrides."""


@dataclasses.dataclass
class DDPConfig:
    """``ddp``: ``DDPStrategy`` options (``timeout_s``: the collective timeout in seconds)."""

    find_unused_parameters: bool = MISSING
    static_graph: bool = MISSING
    gradient_as_bucket_view: bool = MISSING
    bucket_cap_mb: int = MISSING
    timeout_s: Optional[float] = MISSING


@dataclasses.dataclass
class CheckpointConfig:
    """``checkpoint``: where and when ``last.ckpt`` and the best checkpoints are written."""

    dir: str = MISSING
    every_n_train_steps: Optional[int] = MISSING
    monitor: Optional[str] = MISSING
    mode: str = one_of("min", "max")
    save_top_k: int = MISSING


@dataclasses.dataclass
class CallbacksConfig:
    """``callbacks``: how often the training callbacks log."""

    log_every_n_steps: int = MISSING
    panels_every_n_steps: int = MISSING
    panels_max_images: int = MISSING
    progress_every_n_steps: int = MISSING


@dataclasses.dataclass
class WandbConfig:
    """``logger.wandb``: ``WandbLogger`` settings (``mode`` null: online when an API key is configured)."""

    project: str = MISSING
    entity: Optional[str] = MISSING
    name: Optional[str] = MISSING
    mode: Optional[str] = one_of(*typing.get_args(WandbMode))  # null: see train.wandb_mode
    save_dir: Optional[str] = MISSING
    tags: list[str] = MISSING
    log_model: bool = MISSING


@dataclasses.dataclass
class LoggerConfig:
    wandb: Optional[WandbConfig] = None


@dataclasses.dataclass
class TrainConfig:
    """The whole training config (``m3leo_stream/configs/train.yaml``)."""

    data: DataConfig = MISSING  # type: ignore[valid-type]
    transforms: TransformsConfig = MISSING  # type: ignore[valid-type]
    model: Any = MISSING  # one of MODELS, by the chosen config
    task: Any = MISSING  # one of TASKS
    trainer: TrainerConfig = MISSING  # type: ignore[valid-type]
    logger: Optional[LoggerConfig] = None
    ddp: DDPConfig = MISSING
    checkpoint: CheckpointConfig = MISSING
    callbacks: CallbacksConfig = MISSING
    experiment_name: str = MISSING
    seed: int = MISSING
    run_dir: str = MISSING
    resume: Optional[str] = MISSING  # auto | null | checkpoint path or URL
    record_keys_dir: Optional[str] = MISSING
    test_after_fit: bool = MISSING
    save_encoder: bool = MISSING
    matmul_precision: str = one_of("highest", "high", "medium")
    verbose: bool = MISSING  # debug logs, tracebacks, every dependency warning


def register(cs: ConfigStore | None = None) -> None:
    """Store the schemas: ``train_schema`` (the primary config's) and, per group, ``<option>_schema`` that the
    group's YAML files extend."""
    cs = cs or ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(group="data", name="default_schema", node=DataConfig)  # data/default.yaml extends it (train, embed)
    for name, node in MODELS.items():
        cs.store(group="model", name=f"{name}_schema", node=node)
    for name, node in TASKS.items():
        cs.store(group="task", name=f"{name}_schema", node=node)


def plain(cfg: Any) -> Any:
    """A config node as plain dicts and lists, interpolations resolved (what the classes it configures take);
    anything else as it is."""
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


class ConfigError(ValueError):
    """A key or value the schema refuses; the message is one line that names the key."""


def _check_choices(schema: type, tree: Any, where: str) -> None:
    """Every value in ``tree`` (plain containers) of a field of ``schema`` with :data:`CHOICES` is one of them;
    interpolations are left to their target's check."""
    if not (dataclasses.is_dataclass(schema) and isinstance(tree, Mapping)):
        return
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        key, v = ".".join(p for p in (where, f.name) if p), tree.get(f.name)
        inner = [a for a in typing.get_args(hints[f.name]) if a is not type(None)] or [hints[f.name]]
        if isinstance(v, Mapping):
            _check_choices(inner[0], v, key)
        choices = f.metadata.get(CHOICES, ())
        if choices and isinstance(v, str) and v != MISSING and not v.startswith("${") and v not in choices:
            raise ConfigError(f"config key {key}: {v!r} is not one of {', '.join(choices)} (every key: --cfg job)")


def _check(schema: type, node: Any, where: str) -> None:
    try:
        # a plain tree: keys added to ``node`` with ``+`` are not taken as schema
        merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.to_container(node)
                                 if isinstance(node, DictConfig) else node)
    except OmegaConfBaseException as e:
        full = ".".join(p for p in (where, str(getattr(e, "full_key", "") or "")) if p)
        key = str(getattr(e, "key", "") or "")
        known = [f.name for f in dataclasses.fields(getattr(e, "object_type", None) or schema)] \
            if dataclasses.is_dataclass(getattr(e, "object_type", None) or schema) else []
        near = difflib.get_close_matches(key, known, n=1) if key and key not in known else []
        hint = f"; did you mean {near[0]!r}?" if near else ""
        msg = str(getattr(e, "msg", e)).splitlines()[0]
        raise ConfigError(f"config key {full}: {msg}{hint} (every key: --cfg job)") from None
    _check_choices(schema, OmegaConf.to_container(merged, resolve=False), where)


def validate(cfg: DictConfig) -> None:
    """Check the composed ``cfg`` against the schemas, including what Hydra's composition lets through (keys added
    with ``+``) and ``model`` / ``task`` against the schema of their ``name`` / ``_target_``. Raises
    :class:`ConfigError` naming the first key refused."""
    _check(TrainConfig, cfg, "")
    name = cfg.model.get("name")
    if name not in MODELS:
        raise ConfigError(f"config key model.name: unknown model {name!r} (one of {', '.join(MODELS)})")
    _check(MODELS[name], cfg.model, "model")
    try:
        cls = get_class(str(cfg.task.get("_target_")))
    except Exception as e:  # noqa: BLE001 - hydra's error for a target it cannot import
        raise ConfigError(f"config key task._target_: {e}".splitlines()[0]) from None
    _check(task_schema(cls), cfg.task, "task")
