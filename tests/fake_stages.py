"""Three tiny stages for testing the pipeline machinery without models.

`first` writes one file; `items` writes one file per item (logging each item it computes,
so a test can kill it mid-run and see what the rerun redoes); `last` reads both. Keys: first <- cam.epochs,
items <- cam.scales, last <- labels.beta.
"""

from wsseg.stage import Stage
from wsseg.store import atomic_path


def _run_first(ctx):
    with atomic_path(ctx.folder("first") / "model.txt") as tmp:
        tmp.write_text(f"epochs={ctx.config.cam.epochs}")
    return {"metrics": {"loss": 0.5}}


NUM_ITEMS = 20


def _run_items(ctx):
    folder = ctx.folder("items")
    computed = 0
    for index in range(NUM_ITEMS):
        path = folder / f"{index:04d}.txt"
        if path.exists():
            continue
        with open(ctx.store.root / "computed.log", "a") as log:
            log.write(f"{index}\n")
        with atomic_path(path) as tmp:
            tmp.write_text(f"{index} scales={ctx.config.cam.scales}")
        computed += 1
    return {"metrics": {"count": NUM_ITEMS}, "items": {"done": NUM_ITEMS, "total": NUM_ITEMS}}


def _count_items(config, store):
    folder = store.folder("items")
    return (len(list(folder.glob("[0-9]*.txt"))) if folder.exists() else 0), NUM_ITEMS


def _run_last(ctx):
    with atomic_path(ctx.folder("last") / "out.txt") as tmp:
        tmp.write_text("done")
    return {"metrics": {"score": 1.0}}


FIRST = Stage(name="first", help="one file", run=_run_first, outputs=("first",), reads=("cam.epochs",), headline="loss")
ITEMS = Stage(name="items", help="one file per item", run=_run_items, outputs=("items",), needs=("first",),
              reads=("cam.scales",), count_done=_count_items)
LAST = Stage(name="last", help="reads both", run=_run_last, outputs=("last",), needs=("first", "items"), reads=("labels.beta",))
STAGES = (FIRST, ITEMS, LAST)
