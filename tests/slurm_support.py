"""Helpers for tests that run jobs on a real Slurm cluster (``ci/slurm-up.sh`` starts one on loopback).

``require_slurm`` fails under CI=true and skips elsewhere when no usable cluster answers (``need_service`` of
``tests/conftest.py``); ``sbatch`` submits with the environment a job needs to import this checkout; ``wait_job``
polls ``squeue`` every 0.5 s (``sbatch --wait`` polls every ~10 s) and returns the final ``scontrol`` records.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
TINY_SHARD_SIZE = "20MB"  # 2 regions x 6 synthetic chips -> 12 shards (train: 4 chips per region)


def _conftest():
    """tests/conftest.py as a module of its own name (pytest may have several modules called ``conftest``)."""
    name = "_m3leo_tests_conftest"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, TESTS / "conftest.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def need_service(what: str, reason: str) -> None:
    _conftest().need_service(what, reason)


def _run(*cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def slurm_problem(nodes: int = 1) -> str | None:
    """Why this machine cannot run the tests' jobs, or None: the clients exist, slurmctld answers, and at least
    ``nodes`` nodes are usable (idle, mixed or allocated)."""
    for exe in ("sbatch", "squeue", "scontrol", "sinfo", "scancel"):
        if shutil.which(exe) is None:
            return f"{exe} is not on PATH (start a cluster with: bash ci/slurm-up.sh)"
    try:
        ping = _run("scontrol", "ping", timeout=15)
    except subprocess.TimeoutExpired:
        return "scontrol ping timed out"
    if ping.returncode != 0 or "UP" not in ping.stdout:
        return f"slurmctld does not answer ({(ping.stdout + ping.stderr).strip()}); run: bash ci/slurm-up.sh"
    states = _run("sinfo", "-h", "-N", "-o", "%N %t").stdout.split("\n")
    usable = {ln.split()[0] for ln in states if ln.strip() and ln.split()[1].rstrip("*~#") in ("idle", "mix", "alloc")
              and not ln.split()[1].endswith("*")}
    if len(usable) < nodes:
        return f"{nodes} usable node(s) needed, sinfo shows: {'; '.join(s for s in states if s.strip())}"
    return None


def require_slurm(nodes: int = 1) -> None:
    """Fail under CI=true, skip elsewhere, when the cluster cannot run a job on ``nodes`` nodes."""
    problem = slurm_problem(nodes)
    if problem:
        need_service("Slurm", problem)


def job_env(**extra: str) -> dict[str, str]:
    """The submitting environment: this interpreter as PYTHON, this checkout first on PYTHONPATH (so a git
    worktree's packages win over an editable install elsewhere), loopback rendezvous, W&B offline."""
    env = dict(os.environ)
    env.update(PYTHON=sys.executable, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
               MASTER_ADDR="127.0.0.1", WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def sbatch(args: list[str], *, cwd: Path, env: dict[str, str] | None = None) -> str:
    """``sbatch --parsable ARGS`` in ``cwd``; returns the job id."""
    res = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env=env or job_env(), capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, f"sbatch {' '.join(args)} failed: {res.stderr}"
    return res.stdout.strip().split(";")[0]


def expand_nodelist(nodelist: str) -> list[str]:
    """``vm,vmx[1-2]`` -> ``["vm", "vmx1", "vmx2"]``."""
    return _run("scontrol", "show", "hostnames", nodelist).stdout.split()


def job_records(job: str) -> list[dict[str, str]]:
    """``scontrol show job`` records of a job (one per array task), as dicts; [] once Slurm forgot it."""
    res = _run("scontrol", "-o", "show", "job", job)
    out = []
    for line in res.stdout.splitlines():
        rec = {}
        for field in line.split():
            k, _, v = field.partition("=")
            rec[k] = v
        if rec:
            out.append(rec)
    return out


def in_queue(job: str) -> bool:
    res = _run("squeue", "-h", "-j", job, "-o", "%i %T")
    return bool(res.stdout.strip())


def wait_job(job: str, timeout: float = 240, logs: list[Path] | None = None) -> list[dict[str, str]]:
    """Wait until ``job`` (all its array tasks, all its requeued runs) has left the queue; returns its records.
    On timeout the job is cancelled and the assertion message carries the logs."""
    deadline = time.monotonic() + timeout
    while in_queue(job):
        if time.monotonic() > deadline:
            _run("scancel", job)
            raise AssertionError(f"job {job} still in the queue after {timeout} s; {describe(job, logs)}")
        time.sleep(0.5)
    return job_records(job)


def describe(job: str, logs: list[Path] | None = None) -> str:
    """Job records and log tails, for assertion messages."""
    fields = ("JobId", "JobState", "ExitCode", "Restarts", "Reason")
    parts = [f"records: {[{k: r.get(k) for k in fields} for r in job_records(job)]}"]
    for p in logs or []:
        for f in sorted(Path(p).parent.glob(Path(p).name)) if any(c in str(p) for c in "*?") else [Path(p)]:
            text = f.read_text(errors="replace") if f.exists() else "(missing)"
            parts.append(f"--- {f} (last 4000 chars)\n{text[-4000:]}")
    return "\n".join(parts)


def assert_completed(records: list[dict[str, str]], job: str, logs: list[Path] | None = None) -> None:
    assert records, f"job {job}: Slurm has no record of it (MinJobAge passed?)"
    bad = [r for r in records if r.get("JobState") != "COMPLETED" or r.get("ExitCode") != "0:0"]
    assert not bad, f"job {job} did not complete cleanly; {describe(job, logs)}"
