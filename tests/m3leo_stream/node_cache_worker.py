"""A rank of one node reading through the node cache, for tests/m3leo_stream/test_node_cache.py (a real process).

    python node_cache_worker.py ROOT CACHE_DIR ENDPOINT same|epoch GO_FILE [ROWS...]

``same``: wait for GO_FILE, then read the index rows ROWS as one batch; ``epoch``: iterate the training loader's
epoch 0. Prints the cache's counters as JSON.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from m3leo_stream.datamodule import M3LEODataModule


def main() -> None:
    root, cache_dir, endpoint, mode, go, *rows = sys.argv[1:]
    dm = M3LEODataModule(root, inputs=["modisveg"], targets=["esawc"], batch_size=1, num_workers=0,
                         storage_options={"endpoint_url": endpoint}, cache_dir=cache_dir, cache_bytes=1 << 30)
    dm.setup()
    loader = dm.train_dataloader()
    ds = loader.dataset
    if mode == "same":
        ds.node_plan = None  # no prefetch: only the rows asked for are fetched
        print("ready", flush=True)
        while not Path(go).exists():
            time.sleep(0.01)
        ds.__getitems__([int(r) for r in rows])
    else:
        for _ in loader:
            pass
    cache = ds.cache()
    cache.close()
    print(json.dumps(cache.stats.as_dict()))


if __name__ == "__main__":
    main()
