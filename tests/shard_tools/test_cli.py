"""The ``m3leo-shards`` command line: a clean exit after reading the index, tables by default and JSON on request,
options that document themselves, and user mistakes as one error line with a non-zero exit."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from m3leo_stream import __version__
from m3leo_stream.shard_root import ShardRoot
from shard_tools.cli import HelpFormatter, main, make_parser
from shard_tools.inspect import inspect_root

REPO = Path(__file__).resolve().parents[2]


def _run(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    """``m3leo-shards ARGS`` (or ``python -c CODE``) in a fresh interpreter."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "shard_tools.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


def _run_all(commands: list[tuple[str, ...]], jobs: int = 4, code: str | None = None):
    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(lambda c: _run(*c, code=code), commands))


# ----------------------------------------------------------------------------------------------- clean exit

# read the index and exit at once: the shortest path from pq.read_table's return to interpreter shutdown, where
# the scan's teardown on an Arrow worker can abort the process (exit 134; about one run in four without the fix)
READ_INDEX_AND_EXIT = ("import sys\nfrom m3leo_stream.shard_root import ShardRoot\n"
                       "ShardRoot(sys.argv[1]).read_index(['region', 'split'], filters=[('split', '=', 'train')])\n")


def test_inspect_exits_zero_in_fresh_processes(small_shards):
    runs = _run_all([("inspect", str(small_shards))] * 6) + _run_all([(str(small_shards),)] * 16,
                                                                       code=READ_INDEX_AND_EXIT)
    for p in runs:
        assert p.returncode == 0 and "terminate called" not in p.stderr, (p.returncode, p.stderr[-2000:])
    assert "samples" in runs[0].stdout


def test_read_index_owns_its_buffer(small_shards, monkeypatch):
    """The table comes from Arrow memory: parsing never sees the Python file object (whose buffers need the GIL
    when an Arrow worker frees them)."""
    import pyarrow.parquet as pq

    from m3leo_stream.shard_root import ShardRoot

    seen = []
    real = pq.read_table
    monkeypatch.setattr(pq, "read_table", lambda source, **kw: seen.append(type(source).__name__) or real(source, **kw))
    t = ShardRoot(str(small_shards)).read_index(["key", "split"], filters=[("split", "=", "val")])
    assert seen == ["BufferReader"] and t.num_rows > 0 and set(t.column("split").to_pylist()) == {"val"}


# ----------------------------------------------------------------------------------------------- inspect output


def test_inspect_table_by_default_json_on_request(small_shards, capsys):
    assert main(["inspect", str(small_shards)]) == 0
    table = capsys.readouterr().out
    summary = inspect_root(str(small_shards))
    lines = table.splitlines()
    assert lines[0].startswith(f"{small_shards}: {summary['samples']} samples in {summary['shards']} shards")
    head = next(ln.split() for ln in lines if ln.split()[:1] == ["samples"])
    assert head == ["samples", "train", "val", "test", "all"]
    total = next(ln.split() for ln in lines if ln.split()[:1] == ["all"])
    assert total[-1] == str(summary["samples"])
    for region, splits in summary["regions"].items():
        row = next(ln.split() for ln in lines if ln.split()[:1] == [region])
        assert row[1:4] == [str(splits[s]["samples"]) for s in ("train", "val", "test")]
    s1 = next(ln.split() for ln in lines if ln.split()[:1] == ["s1grd"])
    assert s1[1:4] == ["sar_db", "int16", "16x448x448"]
    assert len(lines) < 40  # a table, not 300 lines of JSON

    assert main(["inspect", str(small_shards), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(summary, default=str))


def test_inspect_keys_and_one_key(small_shards, capsys):
    assert main(["inspect", str(small_shards), "--keys"]) == 0
    rows = [ln.split("\t") for ln in capsys.readouterr().out.splitlines()]
    assert len(rows) == inspect_root(str(small_shards))["samples"] and all(len(r) == 4 for r in rows)
    key, region, split, shard = rows[0]
    assert shard.startswith(f"{region}/{split}/")

    assert main(["inspect", str(small_shards), "--key", key]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"{key} in {shard}") and "member" in text and "16x448x448" in text
    assert main(["inspect", str(small_shards), "--key", key, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["key"] == key and doc["samples"][0]["members"]["s1grd"]["shape"] == [16, 448, 448]


# ----------------------------------------------------------------------------------------------- options


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"m3leo-shards {__version__}"


def test_every_option_has_help_and_shows_its_default():
    fmt = HelpFormatter("m3leo-shards")
    parser = make_parser()
    for name, sp in {"": parser, **_subparsers(parser)}.items():
        for action in sp._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            if action.help == argparse.SUPPRESS:  # a renamed option, which only says its new name
                continue
            assert action.help, f"{name} {action.option_strings or action.dest}: no help"
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                assert "default" in fmt._get_help_string(action), f"{name} {action.option_strings}: no default"
        sp.format_help()  # every %(default)s expands


def test_verbose_before_or_after_the_command():
    parser = make_parser()
    assert parser.parse_args(["-v", "inspect", "r"]).verbose is True
    assert parser.parse_args(["inspect", "r", "-v"]).verbose is True
    assert parser.parse_args(["inspect", "--verbose", "r"]).verbose is True
    assert parser.parse_args(["inspect", "r"]).verbose is False


def test_read_only_commands_take_a_root_and_one_modalities_file_option(capsys):
    subs = _subparsers(make_parser())
    for name in ("inspect", "verify", "stats", "card"):
        positionals = [a.dest for a in subs[name]._actions if not a.option_strings]
        assert positionals == ["root"], (name, positionals)
    for name in ("build", "probe", "ingest-raster"):
        shown = [s for a in subs[name]._actions if a.help != argparse.SUPPRESS for s in a.option_strings]
        assert "--modalities-file" in shown and "--modalities-yaml" not in shown
    with pytest.raises(SystemExit) as e:
        make_parser().parse_args(["build", "src", "out", "--modalities-yaml", "m.yaml"])
    assert e.value.code == 2 and "--modalities-yaml is now --modalities-file" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- show


def test_show_writes_a_png_of_the_chip(small_shards, tmp_path, capsys):
    import matplotlib.image
    import numpy as np

    from m3leo_stream import render
    from m3leo_stream.modalities import REGISTRY

    key = ShardRoot(str(small_shards)).read_index(["key"]).column("key")[3].as_py()
    out = tmp_path / "pics" / "chip.png"
    assert main(["show", str(small_shards), "--key", key, "-o", str(out), "--modalities", "esawc,s2rgbm",
                 "--size", "256"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    img = (matplotlib.image.imread(out)[..., :3] * 255).round().astype(np.uint8)
    assert img.shape[1] == 2 * (256 + 2 * render.PAD_PX) and img.shape[0] > 256 + render.TITLE_PX
    colours = {tuple(c) for c in img.reshape(-1, 3)[::7]}
    assert img.std() > 0 and len(colours) > 20
    wc = {tuple(int(h[i:i + 2], 16) for i in (1, 3, 5)) for h in REGISTRY["esawc"].display.palette}
    assert len(wc & colours) >= 3  # land cover in the WorldCover legend's colours
    # the default key is the index's first sample, and every modality it holds is drawn
    assert main(["show", str(small_shards), "-o", str(tmp_path / "first.png"), "--size", "32"]) == 0
    assert matplotlib.image.imread(tmp_path / "first.png").shape[1] == 3 * (32 + 2 * render.PAD_PX)


def test_show_mistakes_are_one_error_line_and_exit_2(small_shards, tmp_path):
    cases = [
        (("show", str(small_shards), "--key", "nokey", "-o", str(tmp_path / "a.png")), "no sample with key 'nokey'"),
        (("show", str(tmp_path / "missing"), "-o", str(tmp_path / "b.png")), "missing: no such shard root"),
        (("show", str(small_shards), "--modalities", "s2rgbm,bogus", "-o", str(tmp_path / "c.png")),
         "unknown modality 'bogus'"),
    ]
    for (args, words), p in zip(cases, _run_all([c[0] for c in cases])):
        err = p.stderr.strip().splitlines()
        assert p.returncode == 2, (args, p.returncode, p.stderr)
        assert len(err) == 1 and err[0].startswith("m3leo-shards: error: ") and words in err[0], (args, p.stderr)
    assert not list(tmp_path.glob("*.png"))


# ----------------------------------------------------------------------------------------------- user mistakes


def test_user_mistakes_are_one_error_line_and_exit_2(small_shards, synth_src, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.yaml").write_text("modalities: [{name: x\n")
    out = str(tmp_path / "never")
    cases = [
        (("inspect", str(tmp_path / "missing")), "missing: no such shard root"),
        (("inspect", str(tmp_path / "empty")), "empty: no manifest.json"),
        (("inspect", str(small_shards / "index.parquet")), "not a shard root (a file, not a directory)"),
        (("inspect", str(small_shards), "--key", "nokey"), "no sample with key 'nokey'"),
        (("verify", str(tmp_path / "missing")), "no such shard root"),
        (("stats", str(tmp_path / "empty")), "no manifest.json"),
        (("card", str(tmp_path / "missing")), "no such shard root"),
        (("inspect", str(small_shards), "--storage-options", "{bad"), "--storage-options is not valid JSON"),
        (("build", str(synth_src), out, "--modalities", "s1grd,bogus"), "unknown modality 'bogus'"),
        (("build", str(synth_src), out, "--folder", "bogus=x"), "--folder bogus=x: unknown modality 'bogus'"),
        (("build", str(synth_src), out, "--shard-size", "12XB"), "--shard-size '12XB' is not a size"),
        (("build", str(synth_src), out, "--modalities-file", str(tmp_path / "bad.yaml")), "invalid YAML"),
        (("build", str(tmp_path / "empty"), out), "no M3LEO region"),
    ]
    for (args, words), p in zip(cases, _run_all([c[0] for c in cases])):
        err = p.stderr.strip().splitlines()
        assert p.returncode == 2, (args, p.returncode, p.stderr)
        assert len(err) == 1 and err[0].startswith("m3leo-shards: error: ") and words in err[0], (args, p.stderr)
    assert not Path(out).exists()
    # -v: the traceback, then the same line
    for (args, words), p in zip(cases[:2], _run_all([("-v", *c[0]) for c in cases[:2]])):
        err = p.stderr.strip().splitlines()
        assert p.returncode == 2 and "Traceback (most recent call last)" in p.stderr and words in err[-1], p.stderr


def test_bad_option_values_are_usage_errors(tmp_path):
    for args, words in ((("build", "s", "o", "--workers", "0"), "argument --workers: must be at least 1, got 0"),
                        (("synth", "o", "--chips-per-region", "x"), "argument --chips-per-region: 'x' is not a whole"),
                        (("inspect",), "the following arguments are required: ROOT")):
        with pytest.raises(SystemExit) as e:
            make_parser().parse_args(list(args))
        assert e.value.code == 2, args
    procs = _run_all([("build", "s", "o", "--workers", "0"), ("bogus",)])
    for p in procs:
        assert p.returncode == 2 and "Traceback" not in p.stderr and "error:" in p.stderr.splitlines()[-1]
    assert "argument --workers: must be at least 1, got 0" in procs[0].stderr


def test_an_unexpected_error_is_one_line_without_v_and_a_traceback_with_it(monkeypatch, caplog):
    import shard_tools.inspect as ins

    def broken(*a, **k):
        raise RuntimeError("something inside broke")

    monkeypatch.setattr(ins, "inspect_root", broken)
    assert main(["inspect", "somewhere"]) == 1
    (rec,) = [r for r in caplog.records if r.levelname == "ERROR"]
    assert rec.getMessage() == "RuntimeError: something inside broke (-v shows the traceback)" and not rec.exc_info
    caplog.clear()
    assert main(["inspect", "somewhere", "-v"]) == 1
    (rec,) = [r for r in caplog.records if r.levelname == "ERROR"]
    assert rec.exc_info and rec.exc_info[0] is RuntimeError
