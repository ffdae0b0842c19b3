"""Test-only launcher: `python tests/integration/ema_reference_launcher.py --config ... [k=v ...]`.

Runs `training.train.main` unchanged and, beside it, a reference EMA of the FULL parameters: at the EMA's
construction and after each of its updates, every rank's current weights are gathered
(`training.engine.gather_full`, i.e. exactly what production avoids doing per step) and rank 0 folds them
into a plain `training.ema.EMA` over full tensors, written to OUTPUT/ema_reference.safetensors. A test
then compares it with the export, which production assembles from the EMA each rank kept of its own
ZeRO-3 partition. Wrapping happens here, in the test's process only; the product has no hook for it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch.distributed as dist
from safetensors.torch import save_file

from training import engine as ds
from training import ema as ema_module
from training import train

_engines: list = []
_reference: dict = {}
_initialize, _ema_init, _ema_update = ds.initialize, ema_module.EMA.__init__, ema_module.EMA.update


def _output_dir(argv: list[str]) -> Path:
    return Path(next(a.split("=", 1)[1] for a in argv if a.startswith("output_dir=")))


def _gather():
    infos, local = ds.local_param_shards(_engines[-1])
    return ds.gather_full(infos, local, is_main=dist.get_rank() == 0)


def initialize(*args, **kwargs):
    engine = _initialize(*args, **kwargs)
    _engines.append(engine)
    return engine


def ema_init(self, cfg, tensors):
    _ema_init(self, cfg, tensors)
    full = _gather()
    if dist.get_rank() == 0:
        _reference["names"] = list(full)
        reference = object.__new__(ema_module.EMA)  # the unwrapped constructor: no gather on rank 0 alone
        _ema_init(reference, cfg, list(full.values()))
        _reference["ema"] = reference


def ema_update(self, tensors, step):
    _ema_update(self, tensors, step)
    full = _gather()
    if dist.get_rank() == 0:
        ref = _reference["ema"]
        _ema_update(ref, list(full.values()), step)
        save_file(dict(zip(_reference["names"], ref.shadow)), str(OUT / "ema_reference.safetensors"))


if __name__ == "__main__":
    OUT = _output_dir(sys.argv[1:])
    ds.initialize = initialize
    ema_module.EMA.__init__ = ema_init
    ema_module.EMA.update = ema_update
    sys.exit(train.main(sys.argv[1:]))
