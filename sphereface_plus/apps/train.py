"""``python -m sphereface_plus.apps.train ARGS`` (the old torchrun entry point) = ``python -m sphereface_plus
train ARGS``; it says so once (on rank 0) and runs the command."""
import os
import sys

from sphereface_plus.cli import exit_process, main

if __name__ == "__main__":
    if os.environ.get("RANK", "0") == "0":
        print("note: 'python -m sphereface_plus.apps.train' is now 'python -m sphereface_plus train' "
              "(torchrun ... -m sphereface_plus train ...); this old form still works", file=sys.stderr)
    exit_process(main(["train", *sys.argv[1:]]))
