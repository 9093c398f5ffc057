"""One rank of a real multi-process (gloo) loader run; launched by test_datamodule.py.

Writes ``rank<r>.json`` with the keys of every train batch (two epochs) and every val batch with its validity.
With ``--stop-after K`` rank 0 also saves the train loader's state after K batches of epoch 0 and the run stops.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist

from m3leo_stream.datamodule import M3LEODataModule


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("out")
    ap.add_argument("--batch-size", type=int, required=True)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--worker-mode", default="thread")
    ap.add_argument("--stop-after", type=int, default=None)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    dm = M3LEODataModule(args.root, inputs=["modisveg"], targets=["esawc"], batch_size=args.batch_size,
                         num_workers=args.workers, seed=0, worker_mode=args.worker_mode)
    dm.setup("fit")
    record: dict = {"train": [], "val": [], "lengths": []}
    loader = dm.train_dataloader()
    for epoch in range(2):
        loader.batch_sampler.set_epoch(epoch)
        record["lengths"].append(len(loader))
        batches = []
        for i, batch in enumerate(loader):
            assert batch["esawc"].shape[0] == args.batch_size
            batches.append(batch["key"])
            if args.stop_after is not None and i + 1 == args.stop_after:
                if rank == 0:
                    torch.save(loader.state_dict(), os.path.join(args.out, "state.pt"))
                break
        record["train"].append(batches)
        if args.stop_after is not None:
            break
    if args.stop_after is None:
        for batch in dm.val_dataloader():
            record["val"].append(list(zip(batch["key"], batch["valid"].tolist())))
    dist.barrier()
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
