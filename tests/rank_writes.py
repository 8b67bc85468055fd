"""Run a script as its command line does, printing to stderr every write it makes under the
folders of $RANK_WRITES_WATCH (os.pathsep-separated) as "rank R writes: EVENT PATH":

    python -m torch.distributed.run --nproc_per_node=2 tests/rank_writes.py graft.py --out ...

tests/test_torchrun.py runs the scripts through it to see that only rank 0 writes. It watches
Python's audit events (open for writing, mkdir, rename/replace, remove, rmdir, ...), which every
file write of the scripts, torch.save, numpy and matplotlib goes through."""

import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
ONE_PATH = {"os.mkdir", "os.remove", "os.rmdir", "os.truncate", "os.chmod", "os.utime",
            "shutil.rmtree", "os.mkfifo", "os.mknod"}
TWO_PATHS = {"os.rename", "os.link", "os.symlink", "shutil.copyfile", "shutil.move"}


def main():
    rank = os.environ.get("RANK", "0")
    watched = [os.path.realpath(p) for p in os.environ["RANK_WRITES_WATCH"].split(os.pathsep)]

    def inside(path):
        if not isinstance(path, (str, bytes, os.PathLike)):
            return False
        p = os.path.realpath(os.fsdecode(path))
        return "__pycache__" not in p and any(p == w or p.startswith(w + os.sep) for w in watched)

    def hook(event, args):
        paths = []
        if event == "open" and len(args) >= 3:
            path, mode, flags = args[:3]
            if (any(c in mode for c in "wax+") if isinstance(mode, str)
                    else bool((flags or 0) & WRITE_FLAGS)):
                paths = [path]
        elif event in ONE_PATH:
            paths = args[:1]
        elif event in TWO_PATHS:
            paths = args[:2]
        for p in paths:
            if inside(p):
                sys.__stderr__.write(f"rank {rank} writes: {event} {os.fsdecode(p)}\n")

    sys.addaudithook(hook)
    script, sys.argv = sys.argv[1], sys.argv[1:]
    sys.path[0] = ROOT
    runpy.run_path(os.path.join(ROOT, script), run_name="__main__")


if __name__ == "__main__":
    main()
