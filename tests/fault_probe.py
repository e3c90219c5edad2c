"""A build that kills itself with SIGKILL at a chosen point (``python -m tests.fault_probe SOURCE STORE POINT``),
for the fault-injection tests: a real kill -9, at a place a timer could not hit reliably.

Points:
- ``mid-case``: while the third case's arrays are being written (before it is published);
- ``mid-publish``: inside the third root-metadata write, after its new bytes are on disk, before the rename;
- ``after-publish``: right after the second case is published.
"""

from __future__ import annotations

import os
import signal
import sys


def main(source: str, store: str, point: str) -> None:
    import store.fastwrite as fastwrite
    import store.location as location
    import store.writer as writer
    from prep.build import BuildConfig, build_store

    calls = {"write_array": 0, "replace": 0, "commit": 0}

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "mid-case":
        real = fastwrite.write_array

        def write_array(folder, meta, data):
            calls["write_array"] += 1
            if calls["write_array"] == 2 * 3 + 1:  # image and label of two cases, then the third case's image
                die()
            return real(folder, meta, data)

        fastwrite.write_array = write_array  # write_case imports it from the module at each call
    elif point == "mid-publish":
        real_replace = location.os.replace

        class _Os:
            def __getattr__(self, name):
                return getattr(os, name)

            @staticmethod
            def replace(src, dst):
                if str(dst) == os.path.join(store, "zarr.json"):
                    calls["replace"] += 1
                    if calls["replace"] == 4:  # creation, source, then publications: the second publication
                        die()
                return real_replace(src, dst)

        location.os = _Os()
    elif point == "after-publish":
        real_commit = writer.StoreWriter.commit

        def commit(self, *a, **k):
            real_commit(self, *a, **k)
            calls["commit"] += 1
            if calls["commit"] == 2:
                die()

        writer.StoreWriter.commit = commit
    from tests.conftest import TINY
    from tests.helpers import synth_spacing

    build_store(BuildConfig(source=source, store=store, workers=0, spacing=synth_spacing(TINY), publish_every_s=0),
                progress=False)


if __name__ == "__main__":
    main(*sys.argv[1:4])
