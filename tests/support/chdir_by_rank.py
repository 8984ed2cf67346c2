"""Run a script in a working directory chosen by ``LOCAL_RANK``, for tests of ranks that disagree.

    torchrun --nproc_per_node 2 tests/support/chdir_by_rank.py DIR0:DIR1 /abs/path/script.py ARGS...

Local rank r works in the r-th directory of the ``os.pathsep``-separated list, so a relative path
names a different directory on each rank: a node without the shared mount, on one machine.
"""

import os
import runpy
import sys

if __name__ == "__main__":
    dirs = sys.argv[1].split(os.pathsep)
    os.chdir(dirs[int(os.environ.get("LOCAL_RANK", "0"))])
    sys.argv = sys.argv[2:]
    runpy.run_path(sys.argv[0], run_name="__main__")
