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


def _folders(values: Sequence[str] | None) -> dict[str, str]:
    out = {}
    for v in values or ():
        if "=" not in v:
            raise SystemExit(f"--folder expects MODALITY=FOLDER, got {v!r}")
        k, f = v.split("=", 1)
        out[k.strip()] = f.strip()
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

    return BuildConfig(
        src=a.src, out=a.out, regions=_csv(a.regions), modalities=_csv(a.modalities),
        splits=_csv(a.splits) or ["train", "val", "test"], shard_size=parse_size(a.shard_size), compress=a.compress,
        workers=a.workers, task_index=a.task_index, num_tasks=a.num_tasks, on_error=a.on_error,
        year=a.year, folders=_folders(a.folder), gunw_pair_rule=a.gunw_pair_rule, modalities_yaml=a.modalities_yaml,
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

    if a.per_folder < 1:
        raise ValueError("--per-folder must be at least 1")
    cfg = ProbeConfig(src=a.src, per_folder=a.per_folder, regions=_csv(a.regions), modalities_yaml=a.modalities_yaml,
                      year=a.year, folders=_folders(a.folder), gunw_pair_rule=a.gunw_pair_rule, on_error=a.on_error,
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
        problems, summary = verify_merge(a.out, a.num_tasks, so, results=a.results)
    else:
        problems, summary = verify(a.out, so, workers=a.workers, progress=not a.quiet, task_index=a.task_index,
                                   num_tasks=a.num_tasks, results=a.results)
        if a.num_tasks > 1:  # the merge step reports and fails; a task fails only when it could not run
            _print_json(summary)
            return 0
    for p in problems:
        sys.stdout.write(f"PROBLEM: {p}\n")
    _print_json(summary)
    return 1 if problems else 0


def cmd_inspect(a: argparse.Namespace) -> int:
    from shard_tools.inspect import inspect_key, inspect_root

    so = parse_storage_options(a.storage_options)
    _print_json(inspect_key(a.out, a.key, so) if a.key else inspect_root(a.out, so))
    return 0


def cmd_card(a: argparse.Namespace) -> int:
    from shard_tools.card import write_card

    path = write_card(a.out, parse_storage_options(a.storage_options))
    sys.stdout.write(f"wrote {path}\n")
    return 0


def cmd_stats(a: argparse.Namespace) -> int:
    from shard_tools.verify import recompute_stats, stats_merge

    so = parse_storage_options(a.storage_options)
    if a.merge:
        path = stats_merge(a.out, a.num_tasks, so, results=a.results)
    else:
        path = recompute_stats(a.out, so, progress=not a.quiet, task_index=a.task_index, num_tasks=a.num_tasks,
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


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="m3leo-shards", description="Repack M3LEO chips into region-grouped tar shards.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    def storage(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--storage-options", default=None,
                        help="JSON fsspec options, e.g. '{\"endpoint_url\": \"http://127.0.0.1:9000\"}'; "
                             "by default S3 settings come from the AWS_* environment variables")
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    s = sub.add_parser("synth", help="generate M3LEO-layout data (hub folders or the parquet release)")
    s.add_argument("out")
    s.add_argument("--regions", default="conus,europe")
    s.add_argument("--chips-per-region", type=int, default=20)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--modalities", default=None, help="comma-separated subset (default: all nine)")
    s.add_argument("--parquet", action="store_true", help="write the parquet-packed release instead of files")
    s.add_argument("--workers", type=int, default=1)
    storage(s)
    s.set_defaults(func=cmd_synth)

    b = sub.add_parser("build", help="build shards from a hub-layout source")
    b.add_argument("src", help="local directory or fsspec URL holding one or more regions")
    b.add_argument("out", help="local directory or fsspec URL (s3://bucket/prefix)")
    b.add_argument("--regions", default=None)
    b.add_argument("--modalities", default=None)
    b.add_argument("--splits", default=None)
    b.add_argument("--shard-size", default="1GB")
    b.add_argument("--compress", choices=["none", "zstd"], default="none")
    b.add_argument("--read-group-shards", type=int, default=None,
                   help="parquet sources: shards' worth of bytes in one reading group, whose shards (all splits) one "
                        "worker builds with one reader, reading each row group once (default 16)")
    b.add_argument("--workers", type=int, default=1)
    b.add_argument("--task-index", type=int, default=int(os.environ.get("SLURM_ARRAY_TASK_ID", 0) or 0))
    b.add_argument("--num-tasks", type=int, default=1)
    b.add_argument("--on-error", choices=["fail", "skip"], default="fail")
    b.add_argument("--year", type=int, default=2020, help="year of year-bearing folders (s1grd-YYYY, ...)")
    b.add_argument("--folder", action="append", metavar="MODALITY=FOLDER",
                   help="read a modality from this data folder (e.g. gunw=gunw_2020-04-01_2020-06-30)")
    b.add_argument("--gunw-pair-rule", default="longest", help="GUNW date pair: longest, shortest or days=N")
    b.add_argument("--resolution", action="append", metavar="MODALITY=PX",
                   help="store MODALITY at PX pixels per side instead of its canonical size (e.g. s1grd=224): an "
                        "exact block reduction by the integer factor canonical/PX, chosen by band kind (power mean "
                        "for SAR dB, mean, circular mean for phase, mode for classes), nodata-aware; repeatable")
    b.add_argument("--modalities-yaml", "--modalities-file", dest="modalities_yaml", default=None,
                   help="YAML file declaring extra or overriding modalities (user rasters ingested with ingest-raster)")
    b.add_argument("--src-storage-options", default=None, help="JSON fsspec options for SRC (default: as OUT)")
    storage(b)
    b.set_defaults(func=cmd_build)

    pl = sub.add_parser("plan", parents=[], add_help=True, conflict_handler="resolve",
                        help="list and size the source once and write the plan every build task reads its share of")
    for action in b._actions[1:]:
        pl._add_action(action)
    pl.add_argument("--reuse-plan", action="store_true",
                    help="reuse an existing plan of the same arguments without listing the source again even where "
                         "its fingerprint cannot cover the data folders (object stores)")
    pl.set_defaults(func=cmd_plan)

    def array(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--task-index", type=int, default=int(os.environ.get("SLURM_ARRAY_TASK_ID", 0) or 0),
                        help="this task's share of the shards (contiguous), with --num-tasks")
        sp.add_argument("--num-tasks", type=int, default=1)
        sp.add_argument("--merge", action="store_true", help="the merge step after all --num-tasks tasks")
        sp.add_argument("--results", default=None, help="where tasks leave results for the merge "
                                                          "(default OUT/_build/<command>)")

    pr = sub.add_parser("probe", help="sample a source's files and say what build would do with each folder")
    pr.add_argument("src", help="local directory or fsspec URL (hf://datasets/..., s3://...) holding regions")
    pr.add_argument("--per-folder", type=int, default=5, help="files sampled per dataset folder and region")
    pr.add_argument("--json", action="store_true", help="print the reports as JSON")
    pr.add_argument("--regions", default=None)
    pr.add_argument("--year", type=int, default=2020, help="as for build: which year-bearing folder is read")
    pr.add_argument("--folder", action="append", metavar="MODALITY=FOLDER", help="as for build")
    pr.add_argument("--gunw-pair-rule", default="longest")
    pr.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                    help="as for build: with skip, bad files do not make the exit code non-zero")
    pr.add_argument("--modalities-yaml", "--modalities-file", dest="modalities_yaml", default=None)
    storage(pr)
    pr.set_defaults(func=cmd_probe)

    g = sub.add_parser("grid", help="chip grid (geojson + stripe split csv, hub layout) for an AOI polygon")
    g.add_argument("--aoi", required=True, help="AOI polygon in lon/lat: a .geojson or .wkt file (or fsspec URL)")
    g.add_argument("--out", required=True, help="folder to hold the region (what build and ingest-raster read)")
    g.add_argument("--region", default=None, help="region name, letters and digits (default: the AOI file's stem)")
    g.add_argument("--chip-size-m", type=float, default=4480.0)
    g.add_argument("--stripes", type=int, default=60, help="number of geographic split stripes")
    g.add_argument("--angle", type=int, default=9, help="stripe tilt from the meridian, degrees")
    g.add_argument("--fractions", default="60-20-20", help="train-val-test proportions of the stripe cycle")
    storage(g)
    g.set_defaults(func=cmd_grid)

    ig = sub.add_parser("ingest-raster", help="cut GeoTIFF/COG rasters (any CRS, mosaics) onto a region's chips")
    ig.add_argument("--chips", required=True, help="folder made by 'grid' (or any hub-layout region with a geojson)")
    ig.add_argument("--raster", required=True, action="append", nargs="+", metavar="PATH_OR_URL",
                    help="one or more rasters (local, http(s), s3://, any fsspec URL); several = a mosaic, the "
                         "first valid pixel wins")
    ig.add_argument("--modality", required=True, help="registry name, or one declared in --modalities-file")
    ig.add_argument("--modalities-file", "--modalities-yaml", dest="modalities_file", default=None,
                    help="YAML declaring user modalities (pass the same file to build)")
    ig.add_argument("--bands", nargs="+", default=None,
                    help="bands to take, by GeoTIFF description or 1-based number (default: all)")
    ig.add_argument("--resampling", default="auto", choices=["auto", "bilinear", "nearest", "average", "mode"])
    ig.add_argument("--workers", type=int, default=1)
    ig.add_argument("--region", default=None, help="region to ingest into when --chips holds several")
    ig.add_argument("--folder", default=None, help="data folder name (default: the modality's, e.g. its name)")
    ig.add_argument("--year", type=int, default=None, help="year for year-bearing folders (esaworldcover-YYYY ...)")
    ig.add_argument("--src-nodata", type=float, default=None, help="nodata value of rasters that lack the tag")
    ig.add_argument("--compress", default="none", choices=["none", "deflate", "zstd", "lzw"],
                    help="chip GeoTIFF compression (upstream chips are uncompressed)")
    storage(ig)
    ig.set_defaults(func=cmd_ingest)

    f = sub.add_parser("finalize", help="merge the shares of an array-job build")
    f.add_argument("out")
    f.add_argument("--source", default=None, help="source URL to record in the manifest")
    storage(f)
    f.set_defaults(func=cmd_finalize)

    v = sub.add_parser("verify", help="check checksums, index ranges and counts")
    v.add_argument("out")
    v.add_argument("--workers", type=int, default=4)
    array(v)
    storage(v)
    v.set_defaults(func=cmd_verify)

    i = sub.add_parser("inspect", help="summary per region/split/modality, or one chip's members")
    i.add_argument("out")
    i.add_argument("--key", default=None)
    storage(i)
    i.set_defaults(func=cmd_inspect)

    c = sub.add_parser("card", help="write a dataset card (README.md) at OUT")
    c.add_argument("out")
    storage(c)
    c.set_defaults(func=cmd_card)

    st = sub.add_parser("stats", help="recompute stats.json from the shards")
    st.add_argument("out")
    array(st)
    storage(st)
    st.set_defaults(func=cmd_stats)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError, KeyError) as e:
        log.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
