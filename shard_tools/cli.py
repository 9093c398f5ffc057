"""The ``m3leo-shards`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from m3leo_stream.storage import parse_storage_options

log = logging.getLogger("m3leo-shards")


def _csv(text: str | None) -> list[str] | None:
    if text is None or text == "":
        return None
    return [t.strip() for t in text.split(",") if t.strip()]


def _folders(values: Sequence[str] | None, modalities_file: str | None) -> dict[str, str]:
    """``--folder MODALITY=FOLDER`` values as a dict; a modality the registry (and the file) lacks is an error."""
    from m3leo_stream.modalities import REGISTRY, load_user_modalities

    out = {}
    for v in values or ():
        if "=" not in v:
            raise ValueError(f"--folder expects MODALITY=FOLDER (e.g. gunw=gunw_2020-04-01_2020-06-30), got {v!r}")
        k, f = v.split("=", 1)
        out[k.strip()] = f.strip()
    if out:
        known = load_user_modalities(modalities_file) if modalities_file else REGISTRY
        for k, f in out.items():
            if k not in known:
                raise ValueError(f"--folder {k}={f}: unknown modality {k!r}; known: {', '.join(known)}")
    return out


def _print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def cmd_synth(a: argparse.Namespace) -> int:
    from shard_tools.synth import FOLDERS, SynthConfig, synth

    cfg = SynthConfig(
        out=a.out, regions=tuple(_csv(a.regions) or ()), chips_per_region=a.chips_per_region, seed=a.seed,
        modalities=tuple(_csv(a.modalities) or FOLDERS), parquet=a.parquet,
        storage_options=parse_storage_options(a.storage_options),
    )
    files = synth(cfg, workers=a.workers, progress=not a.quiet)
    _print_json({"out": a.out, "layout": "parquet" if a.parquet else "files", "files_per_region": files})
    return 0


def _build_config(a: argparse.Namespace):
    from shard_tools.build import BuildConfig, parse_size
    from shard_tools.downsample import parse_resolutions

    try:
        shard_size = parse_size(a.shard_size)
    except ValueError:
        raise ValueError(f"--shard-size {a.shard_size!r} is not a size (e.g. 1GB, 256MiB, 500k or bytes)") from None
    return BuildConfig(
        src=a.src, out=a.out, regions=_csv(a.regions), modalities=_csv(a.modalities),
        splits=_csv(a.splits) or ["train", "val", "test"], shard_size=shard_size, compress=a.compress,
        workers=a.workers, task_index=a.task_index, num_tasks=a.num_tasks, on_error=a.on_error,
        year=a.year, folders=_folders(a.folder, a.modalities_file), gunw_pair_rule=a.gunw_pair_rule,
        modalities_yaml=a.modalities_file,
        storage_options=parse_storage_options(a.storage_options),
        src_storage_options=parse_storage_options(a.src_storage_options) if a.src_storage_options else None,
        progress=not a.quiet, read_group_shards=a.read_group_shards, resolutions=parse_resolutions(a.resolution),
    )


def cmd_build(a: argparse.Namespace) -> int:
    from shard_tools.build import BuildError, build

    cfg = _build_config(a)
    try:
        summary = build(cfg)
    except BuildError as e:
        log.error("build failed: %s", e)
        return 1
    _print_json(summary)
    return 0


def cmd_plan(a: argparse.Namespace) -> int:
    from shard_tools.build import BuildError, plan_build

    try:
        header = plan_build(_build_config(a), reuse=a.reuse_plan)
    except BuildError as e:
        log.error("plan failed: %s", e)
        return 1
    _print_json({k: header[k] for k in ("num_shards", "num_chips", "num_groups", "num_tasks", "tables", "resources")
                 if k in header})
    return 0


def cmd_probe(a: argparse.Namespace) -> int:
    from shard_tools.probe import ProbeConfig, build_would_fail, format_table, probe

    cfg = ProbeConfig(src=a.src, per_folder=a.per_folder, regions=_csv(a.regions), modalities_yaml=a.modalities_file,
                      year=a.year, folders=_folders(a.folder, a.modalities_file), gunw_pair_rule=a.gunw_pair_rule,
                      on_error=a.on_error,
                      storage_options=parse_storage_options(a.storage_options))
    reports = probe(cfg)
    fail = build_would_fail(reports, a.on_error)
    if a.json:
        _print_json({"src": a.src, "build_would_fail": fail, "folders": [r.to_json() for r in reports]})
    else:
        sys.stdout.write(format_table(reports) + "\n")
        sys.stdout.write(("a build with these arguments would FAIL (see 'will fail' above)\n" if fail else
                          "a build with these arguments would succeed on the sampled files\n"))
    return 1 if fail else 0


def cmd_finalize(a: argparse.Namespace) -> int:
    from shard_tools.build import BuildError, finalize

    try:
        _print_json(finalize(a.out, parse_storage_options(a.storage_options), source=a.source))
    except BuildError as e:
        log.error("finalize failed: %s", e)
        return 1
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    from shard_tools.verify import verify, verify_merge

    so = parse_storage_options(a.storage_options)
    if a.merge:
        problems, summary = verify_merge(a.root, a.num_tasks, so, results=a.results)
    else:
        problems, summary = verify(a.root, so, workers=a.workers, progress=not a.quiet, task_index=a.task_index,
                                   num_tasks=a.num_tasks, results=a.results)
        if a.num_tasks > 1:  # the merge step reports and fails; a task fails only when it could not run
            _print_json(summary)
            return 0
    for p in problems:
        sys.stdout.write(f"PROBLEM: {p}\n")
    _print_json(summary)
    return 1 if problems else 0


def cmd_inspect(a: argparse.Namespace) -> int:
    from shard_tools.inspect import format_key, format_root, inspect_key, inspect_root, list_keys

    so = parse_storage_options(a.storage_options)
    if a.keys:
        rows = list_keys(a.root, so)
        if a.json:
            _print_json(rows)
        else:
            sys.stdout.write("".join(f"{r['key']}\t{r['region']}\t{r['split']}\t{r['shard']}\n" for r in rows))
    elif a.key:
        result = inspect_key(a.root, a.key, so)
        _print_json(result) if a.json else sys.stdout.write(format_key(result) + "\n")
    else:
        summary = inspect_root(a.root, so)
        _print_json(summary) if a.json else sys.stdout.write(format_root(summary) + "\n")
    return 0


def cmd_show(a: argparse.Namespace) -> int:
    from m3leo_stream.render import chip_png
    from m3leo_stream.shard_root import ShardRoot

    root = ShardRoot(a.root, parse_storage_options(a.storage_options))
    mods = root.modalities  # a missing or unfinished root: one error line saying so
    key = a.key
    if key is None:
        keys = root.read_index(["key"]).column("key")
        if len(keys) == 0:
            raise ValueError(f"{a.root}: the index holds no samples")
        key = keys[0].as_py()
    names = _csv(a.modalities)
    if names is not None:
        mods.select(names)  # an unknown name: one error line naming the known ones
    path = chip_png(root, key, a.out, names, size=a.size)
    sys.stdout.write(f"wrote {path}\n")
    return 0


def cmd_card(a: argparse.Namespace) -> int:
    from shard_tools.card import write_card

    path = write_card(a.root, parse_storage_options(a.storage_options))
    sys.stdout.write(f"wrote {path}\n")
    return 0


def cmd_stats(a: argparse.Namespace) -> int:
    from shard_tools.verify import recompute_stats, stats_merge

    so = parse_storage_options(a.storage_options)
    if a.merge:
        path = stats_merge(a.root, a.num_tasks, so, results=a.results)
    else:
        path = recompute_stats(a.root, so, progress=not a.quiet, task_index=a.task_index, num_tasks=a.num_tasks,
                               results=a.results)
    sys.stdout.write(f"wrote {path}\n")
    return 0


def cmd_grid(a: argparse.Namespace) -> int:
    from shard_tools.aoi import default_region, load_aoi, make_grid

    so = parse_storage_options(a.storage_options)
    geom = load_aoi(a.aoi, so)
    result = make_grid(geom, a.out, a.region or default_region(a.aoi), a.chip_size_m, a.stripes, a.angle,
                       a.fractions, so)
    _print_json(result.summary())
    return 0


def cmd_ingest(a: argparse.Namespace) -> int:
    from shard_tools.ingest import IngestConfig, IngestError, ingest

    cfg = IngestConfig(
        chips=a.chips, rasters=[r for group in a.raster for r in group], modality=a.modality,
        modalities_file=a.modalities_file, bands=_csv(",".join(a.bands)) if a.bands else None,
        resampling=a.resampling, workers=a.workers, region=a.region, folder=a.folder, year=a.year,
        src_nodata=a.src_nodata, compress=a.compress, storage_options=parse_storage_options(a.storage_options),
        progress=not a.quiet,
    )
    try:
        summary = ingest(cfg)
    except IngestError as e:
        log.error("ingest-raster failed: %s", e)
        return 1
    _print_json(summary)
    return 0


ROOT_HELP = "shard root: local directory or fsspec URL (s3://bucket/prefix, ...)"


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless it has none worth saying (None, False) or says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if (action.option_strings and "default" not in text and d not in (None, False, argparse.SUPPRESS)
                and not isinstance(action, (argparse._HelpAction, argparse._VersionAction))):
            text += " (default: %(default)s)"
        return text


def _int_at_least(minimum: int):
    """An argparse type: a whole number of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {n}")
        return n

    return parse


_positive, _non_negative = _int_at_least(1), _int_at_least(0)


class _RenamedOption(argparse.Action):
    """An option name that is gone: say which one replaced it (kept out of --help)."""

    def __init__(self, option_strings, dest, new: str, **kw):
        self.new = new
        super().__init__(option_strings, dest, nargs="?", help=argparse.SUPPRESS, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is now {self.new}")


def make_parser() -> argparse.ArgumentParser:
    from m3leo_stream import __version__

    p = argparse.ArgumentParser(
        prog="m3leo-shards", formatter_class=HelpFormatter,
        description="Repack M3LEO chips into region-grouped tar shards, and look at, check and describe shard roots.",
        epilog="'m3leo-shards COMMAND --help' describes a command. Mistakes in arguments or data end with one "
               "'m3leo-shards: error: ...' line on stderr and exit status 2; -v adds the traceback.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="debug logging, and the traceback of an error (also accepted after the command)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, func) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
        sp.set_defaults(func=func)
        # SUPPRESS: a subcommand without -v leaves the value given before it alone
        sp.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="debug logging, and the traceback of an error")
        return sp

    def storage(sp: argparse.ArgumentParser, progress: bool = True) -> None:
        sp.add_argument("--storage-options", default=None, metavar="JSON",
                        help="fsspec options as JSON, e.g. '{\"endpoint_url\": \"http://127.0.0.1:9000\"}' "
                             "(default: none; S3 settings come from the AWS_* environment variables)")
        if progress:
            sp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    def modalities_file(sp: argparse.ArgumentParser, what: str) -> None:
        sp.add_argument("--modalities-file", default=None, metavar="YAML", help=what)
        sp.add_argument("--modalities-yaml", action=_RenamedOption, new="--modalities-file")

    s = command("synth", "generate M3LEO-layout data (hub folders or the parquet release) for trying things out",
                cmd_synth)
    s.add_argument("out", metavar="OUT", help="directory or fsspec URL to write the regions to")
    s.add_argument("--regions", default="conus,europe", help="comma-separated region names")
    s.add_argument("--chips-per-region", type=_positive, default=20, help="chips generated in each region")
    s.add_argument("--seed", type=int, default=0, help="random seed (the same seed gives the same files)")
    s.add_argument("--modalities", default=None, help="comma-separated subset (default: all nine)")
    s.add_argument("--parquet", action="store_true", help="write the parquet-packed release instead of files")
    s.add_argument("--workers", type=_positive, default=1, help="processes writing regions in parallel")
    storage(s)

    b = command("build", "build shards from a hub-layout or parquet source", cmd_build)
    b.add_argument("src", metavar="SRC", help="local directory or fsspec URL holding one or more regions")
    b.add_argument("out", metavar="OUT", help="shard root to write: local directory or fsspec URL (s3://bucket/prefix)")
    b.add_argument("--regions", default=None, help="comma-separated regions to build (default: all under SRC)")
    b.add_argument("--modalities", default=None,
                   help="comma-separated modalities to store (default: all the source has)")
    b.add_argument("--splits", default="train,val,test", help="comma-separated splits to build")
    b.add_argument("--shard-size", default="1GB", help="target bytes per shard: 1GB, 256MiB, 500k or a number")
    b.add_argument("--compress", choices=["none", "zstd"], default="none", help="member compression")
    b.add_argument("--read-group-shards", type=_positive, default=None,
                   help="parquet sources: shards' worth of bytes in one reading group, whose shards (all splits) one "
                        "worker builds with one reader, reading each row group once (default: 16)")
    b.add_argument("--workers", type=_positive, default=1, help="processes building shards in parallel")
    b.add_argument("--task-index", type=_non_negative, default=int(os.environ.get("SLURM_ARRAY_TASK_ID", 0) or 0),
                   help="this task's number in an array job of --num-tasks (default: $SLURM_ARRAY_TASK_ID or 0)")
    b.add_argument("--num-tasks", type=_positive, default=1,
                   help="tasks sharing the build; after all, 'finalize' publishes the root")
    b.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                   help="an unreadable or invalid member stops the build (fail) or is left out and counted (skip)")
    b.add_argument("--year", type=int, default=2020, help="year of year-bearing folders (s1grd-YYYY, ...)")
    b.add_argument("--folder", action="append", metavar="MODALITY=FOLDER",
                   help="read a modality from this data folder (e.g. gunw=gunw_2020-04-01_2020-06-30); repeatable")
    b.add_argument("--gunw-pair-rule", default="longest", help="GUNW date pair: longest, shortest or days=N")
    b.add_argument("--resolution", action="append", metavar="MODALITY=PX",
                   help="store MODALITY at PX pixels per side instead of its canonical size (e.g. s1grd=224): an "
                        "exact block reduction by the integer factor canonical/PX, chosen by band kind (power mean "
                        "for SAR dB, mean, circular mean for phase, mode for classes), nodata-aware; repeatable")
    modalities_file(b, "YAML file declaring extra or overriding modalities (e.g. user rasters ingested with "
                       "ingest-raster; pass the same file to both)")
    b.add_argument("--src-storage-options", default=None, metavar="JSON",
                   help="fsspec options for SRC as JSON (default: those of OUT)")
    storage(b)

    pl = command("plan", "list and size the source once and write the plan every build task reads its share of",
                 cmd_plan)
    for action in b._actions:  # build's options, but for those plan has already (help, -v)
        if not any(o in pl._option_string_actions for o in action.option_strings):
            pl._add_action(action)
    pl.add_argument("--reuse-plan", action="store_true",
                    help="reuse an existing plan of the same arguments without listing the source again even where "
                         "its fingerprint cannot cover the data folders (object stores)")

    def array(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--task-index", type=int, default=int(os.environ.get("SLURM_ARRAY_TASK_ID", 0) or 0),
                        help="this task's share of the shards (contiguous), with --num-tasks "
                             "(default: $SLURM_ARRAY_TASK_ID)")
        sp.add_argument("--num-tasks", type=_positive, default=1, help="tasks the work is split into")
        sp.add_argument("--merge", action="store_true", help="the merge step after all --num-tasks tasks")
        sp.add_argument("--results", default=None, help="where tasks leave results for the merge "
                                                          "(default OUT/_build/<command>)")

    pr = command("probe", "sample a source's files and say what build would do with each folder", cmd_probe)
    pr.add_argument("src", metavar="SRC",
                    help="local directory or fsspec URL (hf://datasets/..., s3://...) holding regions")
    pr.add_argument("--per-folder", type=_positive, default=5, help="files sampled per dataset folder and region")
    pr.add_argument("--json", action="store_true", help="print the reports as JSON instead of a table")
    pr.add_argument("--regions", default=None, help="comma-separated regions to probe (default: all under SRC)")
    pr.add_argument("--year", type=int, default=2020, help="as for build: which year-bearing folder is read")
    pr.add_argument("--folder", action="append", metavar="MODALITY=FOLDER", help="as for build; repeatable")
    pr.add_argument("--gunw-pair-rule", default="longest", help="as for build: longest, shortest or days=N")
    pr.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                    help="as for build: with skip, bad files do not make the exit code non-zero")
    modalities_file(pr, "as for build: YAML file declaring extra or overriding modalities")
    storage(pr, progress=False)

    g = command("grid", "chip grid (geojson + stripe split csv, hub layout) for an AOI polygon", cmd_grid)
    g.add_argument("--aoi", required=True, help="AOI polygon in lon/lat: a .geojson or .wkt file (or fsspec URL)")
    g.add_argument("--out", required=True, help="folder to hold the region (what build and ingest-raster read)")
    g.add_argument("--region", default=None, help="region name, letters and digits (default: the AOI file's stem)")
    g.add_argument("--chip-size-m", type=float, default=4480.0, help="chip side in metres")
    g.add_argument("--stripes", type=int, default=60, help="number of geographic split stripes")
    g.add_argument("--angle", type=int, default=9, help="stripe tilt from the meridian, degrees")
    g.add_argument("--fractions", default="60-20-20", help="train-val-test proportions of the stripe cycle")
    storage(g, progress=False)

    ig = command("ingest-raster", "cut GeoTIFF/COG rasters (any CRS, mosaics) onto a region's chips", cmd_ingest)
    ig.add_argument("--chips", required=True, help="folder made by 'grid' (or any hub-layout region with a geojson)")
    ig.add_argument("--raster", required=True, action="append", nargs="+", metavar="PATH_OR_URL",
                    help="one or more rasters (local, http(s), s3://, any fsspec URL); several = a mosaic, the "
                         "first valid pixel wins")
    ig.add_argument("--modality", required=True, help="registry name, or one declared in --modalities-file")
    modalities_file(ig, "YAML file declaring user modalities (pass the same file to build)")
    ig.add_argument("--bands", nargs="+", default=None,
                    help="bands to take, by GeoTIFF description or 1-based number (default: all)")
    ig.add_argument("--resampling", default="auto", choices=["auto", "bilinear", "nearest", "average", "mode"],
                    help="auto: average (continuous) or mode (classes) where a chip pixel spans several source "
                         "pixels, else bilinear or nearest")
    ig.add_argument("--workers", type=_positive, default=1, help="processes cutting chips in parallel")
    ig.add_argument("--region", default=None, help="region to ingest into when --chips holds several")
    ig.add_argument("--folder", default=None, help="data folder name (default: the modality's, e.g. its name)")
    ig.add_argument("--year", type=int, default=None,
                    help="year for year-bearing folders (esaworldcover-YYYY ...; default: none)")
    ig.add_argument("--src-nodata", type=float, default=None,
                    help="nodata value of rasters that lack the tag (default: the rasters' own)")
    ig.add_argument("--compress", default="none", choices=["none", "deflate", "zstd", "lzw"],
                    help="chip GeoTIFF compression (upstream chips are uncompressed)")
    storage(ig)

    f = command("finalize", "merge the shares of an array-job build and publish the root", cmd_finalize)
    f.add_argument("out", metavar="OUT", help="the OUT all tasks of the build wrote to")
    f.add_argument("--source", default=None, help="source URL to record in the manifest (default: the build's SRC)")
    storage(f, progress=False)

    v = command("verify", "check a shard root's checksums, index ranges and counts", cmd_verify)
    v.add_argument("root", metavar="ROOT", help=ROOT_HELP)
    v.add_argument("--workers", type=_positive, default=4, help="threads reading shards")
    array(v)
    storage(v)

    i = command("inspect", "what a shard root holds (samples per region and split, modalities, shards), one "
                           "chip's members, or the list of keys", cmd_inspect)
    i.add_argument("root", metavar="ROOT", help=ROOT_HELP)
    what = i.add_mutually_exclusive_group()
    what.add_argument("--key", default=None, help="show one chip: its metadata and, per member, shape, dtype, "
                                                  "value range and valid fraction")
    what.add_argument("--keys", action="store_true", help="list every sample's key, region, split and shard")
    i.add_argument("--json", action="store_true", help="print JSON instead of tables")
    storage(i, progress=False)

    sh = command("show", "draw one chip as a PNG: a panel per modality (true colour S2, SAR false colour, land "
                         "cover in its legend's colours, other bands through a colormap, no data in magenta)", cmd_show)
    sh.add_argument("root", metavar="ROOT", help=ROOT_HELP)
    sh.add_argument("--key", default=None, help="the chip's key, as 'inspect --keys' lists them "
                                                "(default: the index's first sample)")
    sh.add_argument("-o", "--out", default="chip.png", metavar="PNG", help="the picture to write")
    sh.add_argument("--modalities", default=None,
                    help="comma-separated modalities to draw (default: all the chip holds)")
    sh.add_argument("--size", type=_int_at_least(16), default=448, help="pixels per side of each panel")
    storage(sh, progress=False)

    c = command("card", "write a dataset card (README.md) into a shard root", cmd_card)
    c.add_argument("root", metavar="ROOT", help=ROOT_HELP)
    storage(c, progress=False)

    st = command("stats", "recompute a shard root's stats.json from its shards", cmd_stats)
    st.add_argument("root", metavar="ROOT", help=ROOT_HELP)
    array(st)
    storage(st)
    return p


class _LogFormat(logging.Formatter):
    """Progress logs with time and source; the CLI's own errors as one plain ``m3leo-shards: error: ...`` line
    (after the traceback, which only -v attaches)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if record.name != log.name or record.levelno < logging.ERROR:
            return super().format(record)
        line = f"{log.name}: error: {record.getMessage()}"
        return f"{self.formatException(record.exc_info)}\n{line}" if record.exc_info else line


# Mistakes in arguments, paths or input data: the message says what is wrong; no traceback unless -v.
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def _message(e: BaseException) -> str:
    if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str):
        return e.args[0]  # str(KeyError) is the repr of its message
    if type(e).__module__.split(".")[0] == "yaml":
        return "invalid YAML: " + " ".join(str(e).split())
    return str(e) or type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(_LogFormat())
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, handlers=[handler])
    trace = bool(args.verbose)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    except BrokenPipeError:  # 'm3leo-shards inspect ... | head': stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:
        if isinstance(e, USER_ERRORS) or type(e).__module__.split(".")[0] == "yaml":
            log.error("%s", _message(e), exc_info=trace or None)
            return 2
        log.error("%s: %s%s", type(e).__name__, _message(e), "" if trace else " (-v shows the traceback)",
                  exc_info=trace or None)
        return 1


if __name__ == "__main__":
    sys.exit(main())
