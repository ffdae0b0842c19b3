"""One lock for code that seeds, or saves and restores, torch's global RNG while it builds a model.

A stage-1 actor may build two models at once in two threads: open_clip in the background (a random-weight
model draws its weights from the global RNG right after `torch.manual_seed(0)`, so every actor and every
resumed run gets the same one) and TransNetV2 on a source thread (its package reseeds the global RNG; the
loader restores the state it saved). Interleaved, the restore would rewind the RNG in the middle of
open_clip's initialisation and change its weights. Both hold this lock for their whole build.
"""

from __future__ import annotations

import threading

GLOBAL_RNG_LOCK = threading.Lock()
