"""Test-only launcher: `python tests/integration/kill_during_save_launcher.py STEP_DIR_NAME --config ... [k=v ...]`.

Runs `training.train.main` unchanged, except that `torch.save` is wrapped so that the process SIGKILLs
itself right after the first file it writes into checkpoint folder STEP_DIR_NAME (e.g. step-00000004) is
complete: a real kill in the middle of a real checkpoint save (DeepSpeed's files and the trainer state
are all written with torch.save), with no hook in the product.
"""

from __future__ import annotations

import os
import signal
import sys

import torch

from training import train

_save = torch.save


def main() -> int:
    target, argv = sys.argv[1], sys.argv[2:]

    def save_then_die(obj, f, *args, **kwargs):
        _save(obj, f, *args, **kwargs)
        if isinstance(f, (str, os.PathLike)) and target in os.fspath(f):
            os.kill(os.getpid(), signal.SIGKILL)

    torch.save = save_then_die
    return train.main(argv)


if __name__ == "__main__":
    sys.exit(main())
