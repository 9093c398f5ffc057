"""Read back a W&B offline run file (``run-<id>.wandb``): the LevelDB-log framing W&B uses (7-byte header
``:W&B`` + magic + version, then 32 KiB blocks of records with crc32, length, type) around protobuf ``Record``s."""

from __future__ import annotations

import glob
import json
import os
import struct
from typing import Any

BLOCK = 32768
HEADER = 7


def records(path: str):
    """Yield the decoded ``wandb_internal_pb2.Record`` protobufs of an offline run file."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    pos, buf = HEADER, b""
    while pos + 7 <= len(data):
        left = BLOCK - (pos % BLOCK)
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            buf = chunk
        elif kind == 2:
            buf = chunk
            continue
        elif kind == 3:
            buf += chunk
            continue
        elif kind == 4:
            buf += chunk
        r = pb.Record()
        r.ParseFromString(buf)
        yield r


def read_run(run_dir: str) -> dict[str, Any]:
    """``{"run_id", "history": [row dicts], "config": {key: value}, "summary": last values}`` of an offline run
    directory (``.../offline-run-<time>-<id>``)."""
    files = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    assert files, f"no run-*.wandb in {run_dir}"
    out: dict[str, Any] = {"run_id": None, "history": [], "config": {}, "summary": {}}
    for r in records(files[0]):
        t = r.WhichOneof("record_type")
        if t == "run":
            out["run_id"] = r.run.run_id
            for it in r.run.config.update:
                out["config"][it.key] = json.loads(it.value_json)
        elif t == "config":
            for it in r.config.update:
                out["config"][it.key] = json.loads(it.value_json)
        elif t == "history":
            row = {(it.key or "/".join(it.nested_key)): json.loads(it.value_json) for it in r.history.item}
            out["history"].append(row)
            out["summary"].update(row)
    return out


def offline_runs(save_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(save_dir, "wandb", "offline-run-*")))
