"""``M3LEODataModule``: planned, resumable, region-mixed loading of a shard root for Lightning.

The main process plans (``planner``; this rank's batches: ``batch_sampler``); the reader (``reader``) reads and
decodes on ``num_workers`` threads of the training process that read the next planned batches ahead (``readahead``,
the default ``worker_mode="thread"``) or in DataLoader worker processes (``worker_mode="process"``); the device
transforms run in ``on_after_batch_transfer``. Train loaders (``loader``) are torchdata ``StatefulDataLoader``s whose
position Lightning saves in checkpoints; because a rank's batch ``k`` is its part of global batch ``k``, that
position is the same on every rank and a run resumes at any world size that divides the global batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data._utils.pin_memory import pin_memory

from . import shard_format as sf
from .batch_sampler import PlannedBatchSampler
from .device_feed import DeviceFeed, take
from .index import IndexArrays, load_index, node_arrays
from .loader import LoaderMetrics, M3LEOLoader
from .modalities import Registry
from .node_cache import NodePlan, node_ranks
from .planner import (
    PLANNER_VERSION,
    Catalog,
    EpochPlan,
    PlanError,
    build_catalog,
    plan_eval,
    plan_train_epoch,
    region_quotas,
)
from .readahead import ReadAheadDataset
from .reader import ReaderConfig, ShardDataset, passthrough, read_in_part
from .shard_root import ShardRoot
from .storage import RetryPolicy
from .transforms import bands_needed, build_device_transforms

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

DEFAULT_READAHEAD_BYTES = 4 * 2**30
"""Host bytes read ahead per training process (thread mode): 4 GiB, i.e. 32 GiB on an 8-GPU node, beside the model's
own host memory; pinned memory cannot be swapped, so this is what the node must really have free. At 13.6 MB a sample
(s1grd + s2rgbm) it is ~310 samples: all ``num_workers × prefetch_factor`` batches at small batch sizes, one batch of
256."""


def _digest(facts: Mapping[str, Any]) -> str:
    """A short name fingerprinting JSON-able ``facts``."""
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def last_training_epoch(trainer: Any, batches_per_epoch: int) -> int | None:
    """The last epoch ``trainer`` trains (``max_epochs``, or ``max_steps`` at ``batches_per_epoch`` batches a rank
    and epoch, whichever ends first); None when unbounded or when ``limit_train_batches`` shortens the epochs."""
    if trainer is None:
        return None
    ends = []
    if trainer.max_epochs is not None and trainer.max_epochs >= 0:
        ends.append(int(trainer.max_epochs) - 1)
    plain_epochs = trainer.limit_train_batches in (None, 1.0)
    if trainer.max_steps > 0 and batches_per_epoch > 0 and plain_epochs:
        batches = int(trainer.max_steps) * int(trainer.accumulate_grad_batches)
        ends.append(-(-batches // batches_per_epoch) - 1)
    return min(ends) if ends else None


def _transfer_is_plain(trainer: Any) -> bool:
    """Whether Lightning hands ``on_after_batch_transfer`` the loader's batch unchanged (no input conversion by the
    precision plugin, no user ``on_before_batch_transfer`` / ``transfer_batch_to_device``): only then can the
    transforms of a batch run before Lightning has seen it."""
    from lightning.pytorch.plugins.precision import Precision
    from lightning.pytorch.utilities.model_helpers import is_overridden

    if type(trainer.precision_plugin).convert_input is not Precision.convert_input:
        return False
    hooks = ("on_before_batch_transfer", "transfer_batch_to_device")
    owners = [o for o in (trainer.lightning_module, trainer.datamodule) if o is not None]
    return not any(is_overridden(h, o) for h in hooks for o in owners)


class M3LEODataModule(pl.LightningDataModule):
    """Loaders over a shard root (local directory or fsspec URL) reading only ``inputs`` + ``targets``.

    ``batch_size`` is per device; the global batch is ``batch_size × world size``. ``region_weights`` gives exact
    per-epoch quotas (``samples_per_epoch`` samples in total, default all samples of the weighted regions).
    ``transforms`` is the device-transform config (``configs/transforms``); ``None`` leaves batches raw. With a
    config, only the bands those transforms use are read (``bands``: storage indices per modality); without one, all.
    ``worker_mode="thread"`` (default) reads on ``num_workers`` threads of this process, ``prefetch_factor`` batches
    per thread ahead; ``"process"`` uses DataLoader worker processes (batches then travel through shared memory).
    ``num_workers=0`` reads each batch when it is asked for. The batches are the same in every mode.
    ``readahead_bytes`` caps the host memory read ahead (thread mode): at most ``max(1, readahead_bytes // bytes of
    one batch)`` batches, and never more than ``num_workers × prefetch_factor`` (``None``: no byte cap).
    ``copy_ahead`` (default ``None``: when the trainer's root device is CUDA) copies each batch to the device on a side
    CUDA stream one batch ahead of its step; in thread mode with ``pin_memory`` the reader then reads straight into
    pinned memory. ``True`` also holds the batch ahead on the CPU (no copy; the batches are the same), ``False``
    leaves the copy to Lightning. ``transforms_ahead`` (off by default) also runs the device transforms of the batch
    ahead on that stream when their step can be predicted, and uses that result only when the step and split at
    consumption are the predicted ones (else they run in place as without it).
    ``optional`` names requested modalities a sample may lack: such samples are kept, the absent member is not read,
    and the batch holds zeros and ``<modality>_present`` False for it (the others are required: samples lacking
    them are excluded when planning, counted and logged). ``min_inputs_present`` samples must carry at least that
    many of the ``inputs``.
    ``verify_checksums`` (on by default) checks every member read against the digest the index holds for it (format
    version 2); a member that differs is read again once, then counts as unreadable (``on_unreadable``).
    ``cache_dir`` (default ``$SLURM_TMPDIR``, else the system's temporary directory) is node-local scratch: the index is
    converted there once per node into fixed-width arrays every rank maps (:mod:`m3leo_stream.index`).
    ``cache_bytes`` (0: off) keeps up to that many bytes of the training samples' byte ranges there too, shared by the
    node's ranks, fetched ahead in plan order and evicted by next use in the plan (:mod:`m3leo_stream.node_cache`;
    thread mode, checksummed shard roots); evaluation samples are kept while there is room, and are the first to go
    when training needs it (the training plan never reads them).
    """

    def __init__(
        self,
        root: str,
        inputs: Sequence[str],
        targets: Sequence[str] = (),
        regions: Sequence[str] | None = None,
        region_weights: Mapping[str, float] | None = None,
        batch_size: int = 8,
        num_workers: int = 4,
        seed: int = 0,
        storage_options: Mapping[str, Any] | None = None,
        transforms: Mapping[str, Any] | None = None,
        eval_batch_size: int | None = None,
        samples_per_epoch: int | None = None,
        shuffle_shards: int = 8,
        on_unreadable: Literal["fail", "substitute"] = "fail",
        io_threads: int | None = None,
        coalesce_gap: int = 64 * 1024,
        retry: Mapping[str, float] | None = None,
        prefetch_factor: int = 2,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        splits: Mapping[str, str] | None = None,
        worker_mode: Literal["thread", "process"] = "thread",
        readahead_bytes: int | None = DEFAULT_READAHEAD_BYTES,
        copy_ahead: bool | None = None,
        transforms_ahead: bool = False,
        optional: Sequence[str] = (),
        min_inputs_present: int = 1,
        verify_checksums: bool = True,
        cache_dir: str | None = None,
        cache_bytes: int = 0,
    ):
        super().__init__()
        self.root = str(root)
        self.inputs = list(inputs)
        self.targets = list(targets or [])
        self.regions = list(regions) if regions is not None else None
        self.region_weights = dict(region_weights) if region_weights is not None else None
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.storage_options = dict(storage_options or {})
        self.transforms_config = transforms
        self.samples_per_epoch = samples_per_epoch
        self.shuffle_shards = int(shuffle_shards)
        retry_settings: dict[str, Any] = dict(retry or {})  # from a config: every value may be a float
        self.reader_config = ReaderConfig(io_threads=io_threads, coalesce_gap=coalesce_gap,
                                          on_unreadable=on_unreadable, verify=bool(verify_checksums),
                                          retry=RetryPolicy(**retry_settings))
        self.prefetch_factor = prefetch_factor
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.persistent_workers = persistent_workers
        if worker_mode not in ("thread", "process"):
            raise ValueError(f"worker_mode must be 'thread' or 'process', not {worker_mode!r}")
        self.worker_mode = worker_mode
        self.readahead_bytes = int(readahead_bytes) if readahead_bytes is not None else None
        self.cache_dir = cache_dir
        self.cache_bytes = int(cache_bytes)
        if self.cache_bytes and (worker_mode != "thread" or not verify_checksums):
            raise ValueError("cache_bytes needs worker_mode='thread' (the cache follows the training thread's plan) "
                             "and verify_checksums=True (it serves only bytes checked against the index)")
        if self.readahead_bytes is not None and self.readahead_bytes <= 0:
            raise ValueError(f"readahead_bytes must be positive or None, not {readahead_bytes!r}")
        self.copy_ahead = copy_ahead
        self.transforms_ahead = bool(transforms_ahead)
        self.splits = {s: s for s in sf.SPLITS} | dict(splits or {})
        dup = set(self.inputs) & set(self.targets)
        if dup:
            raise ValueError(f"modalities both input and target: {sorted(dup)}")
        self.optional = [m for m in self.requested if m in set(optional or ())]
        unknown = sorted(set(optional or ()) - set(self.requested))
        if unknown:
            raise ValueError(f"optional modalities {unknown} are neither inputs nor targets "
                             f"(inputs {self.inputs}, targets {self.targets})")
        self.min_inputs_present = int(min_inputs_present)
        if not 0 <= self.min_inputs_present <= len(self.inputs):
            raise ValueError(f"min_inputs_present={min_inputs_present} must be in 0..{len(self.inputs)} "
                             f"(the number of inputs)")
        self.metrics = LoaderMetrics()
        self._shard_root: ShardRoot | None = None
        self._index: IndexArrays | None = None
        self._table: dict[str, np.ndarray] | None = None
        self._catalogs: dict[str, Catalog] = {}
        self._transforms: dict[bool, Any] = {}
        self.bands: dict[str, list[int]] | None = None  # storage indices read per modality (None: all), at setup

    # -- metadata ----------------------------------------------------------------------------------------------
    def __repr__(self) -> str:
        return (f"M3LEODataModule({self.root!r}, inputs={self.inputs}, targets={self.targets}, "
                f"batch_size={self.batch_size})")

    @property
    def shard_root(self) -> ShardRoot:
        if self._shard_root is None:
            self._shard_root = ShardRoot(self.root, self.storage_options)
        return self._shard_root

    @property
    def modalities(self) -> Registry:
        return self.shard_root.modalities

    @property
    def region_names(self) -> list[str]:
        return list(self.shard_root.regions)

    @property
    def requested(self) -> list[str]:
        return self.inputs + self.targets

    def setup(self, stage: str | None = None) -> None:
        if self._index is not None:
            return
        root = self.shard_root
        unknown = [m for m in self.requested if m not in root.modalities]
        if unknown:
            raise ValueError(f"{self.root}: modalities {unknown} are not in this shard root "
                             f"(it has {list(root.modalities)})")
        if self.transforms_config is not None:  # read only the bands the device transforms use
            self.bands = bands_needed(self.transforms_config, root.modalities, inputs=self.inputs,
                                      targets=self.targets)
        verify = self.reader_config.verify and sf.has_checksums(root.manifest)
        if self.reader_config.verify and not verify:
            log.warning("%s has no member checksums (format version %s): its bytes are read unverified; build it "
                        "again to have them", self.root, root.manifest.get("format_version"))
        partial = read_in_part([root.modalities[m] for m in self.requested], self.bands, root.compressed)
        t = time.perf_counter()
        self._index = load_index(root, self.requested, checksums=verify, chunks=partial,
                                 split_names=sorted(set(self.splits.values())), cache_dir=self.cache_dir)
        assert self._index.split is not None  # read: split_names is given
        self._table = {
            "split": self._index.split,
            "shard": self._index.shard,
            **{sf.nbytes_column(m): self._index.nbytes[m] for m in self.requested},
        }
        log.info("%s: index of %d samples (%.0f MB) ready in %.2f s", self.root, len(self._index),
                 self._index.nbytes_held / 1e6, time.perf_counter() - t)

    def catalog(self, split: sf.Split) -> Catalog:
        """Eligible samples of ``split`` (train/val/test, mapped through ``splits``)."""
        self.setup()
        if split not in self._catalogs:
            assert self._table is not None and self._index is not None
            table, index = self._table, self._index

            def build() -> tuple[dict[str, np.ndarray], dict[str, Any]]:
                c = build_catalog(table, self.splits[split], self.region_names, self.requested, self.regions,
                                  region_codes=index.region, optional=self.optional,
                                  min_present=self.min_inputs_present, present_of=self.inputs,
                                  split_names=index.split_names)
                return ({"rows": c.rows, "region": c.region, "shard": c.shard},
                        {"region_names": c.region_names, "excluded": c.excluded, "presence": c.presence})

            arrays, facts = node_arrays(index, f"catalog-{_digest(self._catalog_choice(split))}", build)
            cat = Catalog(split=self.splits[split], region_names=tuple(facts["region_names"]), **arrays,
                          excluded=facts["excluded"], presence=facts["presence"])
            self._catalogs[split] = cat
            log.info("%s: %d samples; per region, samples having each modality (optional: %s): %s", split, len(cat),
                     self.optional or "none", "; ".join(
                         f"{r}: " + ", ".join(f"{m} {n}" for m, n in counts.items())
                         for r, counts in cat.presence.items()))
        return self._catalogs[split]

    @property
    def policy(self) -> dict[str, Any]:
        """Which members a sample must carry: part of the training plan's fingerprint (a resumed run must keep it)."""
        return {"optional": sorted(self.optional), "min_inputs_present": self.min_inputs_present}

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    # -- loaders -----------------------------------------------------------------------------------------------
    def _dataset(self, cat: Catalog, cache: bool = False) -> ShardDataset:
        """The reader of ``cat``; with ``cache`` through the node cache when ``cache_bytes`` is set."""
        assert self._index is not None
        # substitution candidates are a copy of the split's rows in every worker: made only where they are used
        subs = ({r: cat.rows[cat.region == r] for r in range(len(cat.region_names))}
                if self.reader_config.on_unreadable == "substitute" else {})
        config = replace(self.reader_config, inline_local=self._read_ahead, pinned=self._pinned_reads)
        if cache:
            config = replace(config, cache_bytes=self.cache_bytes, cache_dir=self.cache_dir)
        return ShardDataset(self.root, self.storage_options, self._index,
                            [self.modalities[m] for m in self.requested], compressed=self.shard_root.compressed,
                            substitutes=subs, config=config, bands=self.bands, optional=self.optional)

    def _read_ahead_depth(self, batch_nbytes: int) -> int:
        """Batches read ahead in thread mode (none otherwise): ``num_workers × prefetch_factor``, capped by
        ``readahead_bytes`` at ``max(1, readahead_bytes // batch_nbytes)``."""
        if not self._read_ahead:
            return 0
        depth = self.num_workers * self.prefetch_factor
        if self.readahead_bytes is not None:
            depth = min(depth, max(1, self.readahead_bytes // max(1, int(batch_nbytes))))
        return max(1, depth)

    @staticmethod
    def _live_batches(depth: int) -> int:
        """Batches alive at once in thread mode: those read ahead, one read on the spot, two the consumer holds (or,
        with the copy ahead, whose copies are in flight)."""
        return depth + 3

    @property
    def _read_ahead(self) -> bool:
        return self.worker_mode == "thread" and self.num_workers > 0

    def _copy_device(self) -> torch.device | None:
        """Where the loaders copy batches ahead (``copy_ahead``), or ``None``: the trainer's root device when it is
        CUDA; with ``copy_ahead=True`` also the trainer's CPU, or without a trainer the current CUDA device (else the
        CPU)."""
        if self.copy_ahead is False:
            return None
        trainer = getattr(self, "trainer", None)
        device = trainer.strategy.root_device if trainer is not None else None
        if device is not None and device.type == "cuda":
            return device
        if not self.copy_ahead:
            return None
        if device is None and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return device or torch.device("cpu")

    @property
    def _pinned_reads(self) -> bool:
        """Thread mode with CUDA copies ahead: the reader allocates batches in pinned memory (the feed fences them)."""
        device = self._copy_device()
        return bool(self._read_ahead and self.pin_memory and device is not None and device.type == "cuda"
                    and torch.cuda.is_available())

    def _plan_ahead(self, train: bool) -> tuple[Any, int] | None:
        """(transforms, step) for the batch being fetched ahead, when both can be predicted: the split is the
        loader's, and the step is the current one (evaluation) or the next (training, one optimizer step per batch:
        the batch ahead is fetched before the step on the batch handed over now). At consumption the prediction is
        checked; anything this cannot see (manual optimisation stepping twice, a skipped step) only costs a
        recomputation."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or not self.transforms_ahead:
            return None
        t = self.device_transforms(train=train)
        if t is None or bool(trainer.training) != train or not _transfer_is_plain(trainer):
            return None
        if train:
            if int(trainer.accumulate_grad_batches) != 1:
                return None
            return t, int(trainer.global_step) + 1
        return t, int(trainer.global_step)

    def _loader(self, dataset: ShardDataset, sampler: PlannedBatchSampler, train: bool,
                batch_size: int) -> M3LEOLoader:
        workers = self.num_workers
        device = self._copy_device()
        feed = DeviceFeed(device, fence=dataset.fence, counters=self.metrics.feed) if device is not None else None
        ahead = (lambda: self._plan_ahead(train)) if feed is not None and self.transforms_ahead else None
        if self._read_ahead:
            # Lightning's "does not have many workers" hint counts processes; here the readers are threads
            warnings.filterwarnings("ignore", message=r"The '\w+' does not have many workers")
            pinned = self._pinned_reads
            pin = pin_memory if self.pin_memory and torch.cuda.is_available() and not pinned else None
            if self.pin_memory and not torch.cuda.is_available():
                log.warning("pin_memory=True but CUDA is not available: batches are not pinned")
            nbytes = dataset.batch_nbytes(batch_size)
            depth = self._read_ahead_depth(nbytes)
            dataset.set_pooled_batches(self._live_batches(depth))
            if dataset.node_plan is not None:
                dataset.node_plan.lead = depth  # the cache prefetches past what the read-ahead reads
            log.info("%s: reading %d batches ahead (%.1f MB each%s; num_workers × prefetch_factor = %d, "
                     "readahead_bytes = %s)", "train" if train else "eval", depth, nbytes / 1e6,
                     ", pinned" if pinned else "", workers * self.prefetch_factor,
                     "none" if self.readahead_bytes is None else f"{self.readahead_bytes / 2**30:.2f} GiB")
            reader = ReadAheadDataset(dataset, sampler, threads=workers, depth=depth,
                                      pin=pin, next_epoch=train, count=self.metrics.count_read_ahead)
            return M3LEOLoader(reader, batch_sampler=sampler, collate_fn=passthrough, num_workers=0,
                               metrics=self.metrics, feed=feed, plan_ahead=ahead)
        return M3LEOLoader(
            dataset, batch_sampler=sampler, collate_fn=passthrough, num_workers=workers,
            pin_memory=self.pin_memory, prefetch_factor=self.prefetch_factor if workers else None,
            persistent_workers=self.persistent_workers and workers > 0, metrics=self.metrics,
            feed=feed, plan_ahead=ahead,
        )

    def _catalog_choice(self, split: sf.Split) -> dict[str, Any]:
        """What the catalogue of ``split`` depends on besides the index."""
        return {"split": self.splits[split], "regions": self.regions, "modalities": self.requested,
                "optional": self.optional, "min_present": self.min_inputs_present, "present_of": self.inputs}

    def _check_equal_lengths(self, n: int, split: sf.Split) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            lengths = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(lengths, n)
            if len(set(lengths)) != 1:
                raise PlanError(f"{split}: ranks planned different batch counts {lengths}; is every rank reading the "
                                "same shard root?")

    def train_dataloader(self) -> M3LEOLoader:
        cat = self.catalog("train")
        rank, world = self._rank_world()
        gb = self.batch_size * world

        fingerprint = {"planner": PLANNER_VERSION, "split": "train", "seed": self.seed, "global_batch": gb,
                       "samples": len(cat), "region_weights": self.region_weights,
                       "samples_per_epoch": self.samples_per_epoch, "shuffle_shards": self.shuffle_shards,
                       "policy": self.policy}
        name = f"plan-{_digest({**fingerprint, 'catalog': self._catalog_choice('train')})}"

        def plan(epoch: int) -> EpochPlan:
            """The epoch's plan, computed by one process of the node and mapped by the others (all ranks plan the
            same global order); the plans of epochs before the previous one are removed as this one is made."""
            def build() -> tuple[dict[str, np.ndarray], dict[str, Any]]:
                p = plan_train_epoch(cat, seed=self.seed, epoch=epoch, global_batch=gb,
                                     region_weights=self.region_weights, samples_per_epoch=self.samples_per_epoch,
                                     shuffle_shards=self.shuffle_shards)
                return {"refs": p.refs}, {}

            def stale(other: str) -> bool:
                head, _, e = other.rpartition("-e")
                return head == name and e.isdigit() and int(e) < epoch - 1

            assert self._index is not None
            arrays, _ = node_arrays(self._index, f"{name}-e{epoch}", build, drop=stale)
            return EpochPlan(arrays["refs"], gb)
        trainer = getattr(self, "trainer", None)
        # Lightning creates the iterator before calling set_epoch: start at the trainer's epoch already
        epoch = int(trainer.current_epoch) if trainer is not None else 0
        sampler = PlannedBatchSampler(plan, rank, world, epoch=epoch, fingerprint=fingerprint, plan_ahead=True)
        dataset = self._dataset(cat, cache=True)
        first = sampler.plan
        if self.cache_bytes:
            ranks = node_ranks(rank, world)
            uses = f"{name}-w{world}n{ranks[0]}x{len(ranks)}"

            def share(epoch: int, build: Callable[[], np.ndarray]) -> np.ndarray:
                """The node's reads of the epoch, built by one rank and mapped by the others, as the plans are."""
                def stale(other: str) -> bool:
                    head, _, e = other.rpartition("-e")
                    return head == uses and e.isdigit() and int(e) < epoch - 1

                assert self._index is not None
                arrays, _ = node_arrays(self._index, f"{uses}-e{epoch}", lambda: ({"keys": build()}, {}), drop=stale)
                return arrays["keys"]

            dataset.node_plan = NodePlan(plan, lambda: sampler.position, rank, world, ranks, epoch,
                                         last_epoch=last_training_epoch(trainer, first.num_batches), share=share)
        left = sum(region_quotas(cat.region_counts(), self.region_weights, self.samples_per_epoch).values())
        if left % gb:
            log.warning("train: %d samples per epoch is not a multiple of the global batch %d; the last %d samples "
                        "of each epoch's order (a different set every epoch) wait for a later epoch",
                        left, gb, left % gb)
        log.info("train: %d eligible samples (%s), %d batches of %d per rank, world size %d", len(cat),
                 cat.region_counts(), first.num_batches, self.batch_size, world)
        self._check_equal_lengths(first.num_batches, "train")
        return self._loader(dataset, sampler, train=True, batch_size=self.batch_size)

    def _eval_dataloader(self, split: sf.Split) -> M3LEOLoader:
        cat = self.catalog(split)
        rank, world = self._rank_world()
        gb = self.eval_batch_size * world
        assert self._index is not None
        arrays, _ = node_arrays(self._index, f"eval-{_digest({**self._catalog_choice(split), 'global_batch': gb})}",
                                lambda: ({"refs": plan_eval(cat, global_batch=gb).refs}, {}))
        plan = EpochPlan(arrays["refs"], gb)
        sampler = PlannedBatchSampler(lambda epoch: plan, rank, world)
        self._check_equal_lengths(plan.num_batches, split)
        return self._loader(self._dataset(cat, cache=True), sampler, train=False, batch_size=self.eval_batch_size)

    def val_dataloader(self) -> M3LEOLoader:
        return self._eval_dataloader("val")

    def test_dataloader(self) -> M3LEOLoader:
        return self._eval_dataloader("test")

    def plot(self, sample: str | Mapping[str, Any], show_titles: bool = True, suptitle: str | None = None,
             modalities: Sequence[str] | None = None, size: int = 448) -> Figure:
        """A matplotlib Figure of one chip, a panel per modality (TorchGeo's ``plot`` convention): true colour S2,
        SAR false colour, land cover in its palette, other bands through a colormap, no data in magenta.

        ``sample``: a key of this root (read directly, not through the loaders), or one raw sample as the dataset
        yields it (``{modality: (bands, H, W)}`` in stored units, with ``bands`` naming the bands read).
        ``modalities``: which to draw (default: the inputs and targets). Panels are ``size`` pixels square."""
        from .modalities import BANDS_KEY
        from .render import chip_figure

        names = list(modalities or self.requested)
        if isinstance(sample, str):
            chip = self.shard_root.read_sample(sample, names)
            if suptitle is None and show_titles:
                suptitle = f"{sample} ({chip['region']}, {chip['split']})"
            bands = None
        else:
            chip = {n: sample[n].numpy() if isinstance(sample[n], torch.Tensor) else np.asarray(sample[n])
                    for n in names if n in sample}
            if any(a.ndim != 3 for a in chip.values()):
                raise ValueError("plot draws one sample of (bands, H, W) arrays (dataset[i]) or a key, not a batch")
            bands = sample.get(BANDS_KEY)
        return chip_figure(chip, self.modalities, names, bands=bands, size=size, show_titles=show_titles,
                           suptitle=suptitle)

    # -- device side -------------------------------------------------------------------------------------------
    def device_transforms(self, train: bool) -> Any:
        """The device transforms for training or evaluation (``None`` when no transform config was given)."""
        if self.transforms_config is None:
            return None
        if train not in self._transforms:
            rank, _ = self._rank_world()
            self._transforms[train] = build_device_transforms(
                self.transforms_config, self.modalities, self.shard_root.stats, inputs=self.inputs,
                targets=self.targets, train=train, seed=self.seed, rank=rank)
        return self._transforms[train]

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        batch, ticket = take(batch)  # a batch copied ahead: the current stream waits for its copy
        trainer = getattr(self, "trainer", None)
        training = bool(trainer is not None and trainer.training)
        t = self.device_transforms(train=training)
        if t is None:
            return batch
        step = int(trainer.global_step) if trainer is not None else 0
        ready = ticket.result(t, step) if ticket is not None else None
        return ready if ready is not None else t(batch, step=step)

    def loader_metrics(self) -> dict[str, float]:
        """Cumulative samples/s, bytes/s, requests, retries, substitutions and time blocked waiting for data."""
        return self.metrics.as_dict()
