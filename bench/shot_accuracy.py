"""Shot-boundary accuracy and cost, side by side in one run: this project's detector vs the plain ones.

    python -m bench.shot_accuracy [--seeds dev|held-out|all|0,1,...] [--no-transnet-alone] [--repeat 3]

Builds the hard sets of tests/shot_sets.py (real frames of ../shared/data/videos: montages, same-scene
cuts, cuts followed by flashes, flashes and inserts inside shots) for the chosen seeds, decodes them and the
shared clips through curation.decode.decode_video, and scores (tests/shot_scoring.py, +-3 frames, detections
inside fades neutral) on the same frames:
  ours       curation.shots.detect_cuts with the default ShotConfig (TransNetV2 on doubtful candidates)
  no-2nd     the same without a second opinion
  anchor     PySceneDetect AdaptiveDetector() defaults
  content    PySceneDetect ContentDetector() defaults
  transnet   TransNetV2 alone on every frame (its reference windows and predictions_to_scenes)
Prints F1 / splits at flashes per set, for the development seeds and the held-out seeds separately, then
the CPU seconds of each detector per 1000 frames on the shared clips (process time, best of --repeat, one
torch thread, TransNetV2 already loaded, as in a pipeline actor).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from curation.decode import decode_video
from curation.decode_types import DecodeConfig
from curation.shots import SecondOpinion, ShotConfig
from tests import shot_scoring as scoring
from tests.shot_sets import DEV_SEEDS, HELD_OUT_SEEDS, SETS, build_sets

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "videos"


def _seeds(arg: str) -> dict[str, tuple[int, ...]]:
    named = {"dev": {"dev": DEV_SEEDS}, "held-out": {"held-out": HELD_OUT_SEEDS},
             "all": {"dev": DEV_SEEDS, "held-out": HELD_OUT_SEEDS}}
    return named.get(arg) or {"chosen": tuple(int(s) for s in arg.split(","))}


def _detectors(opinion: SecondOpinion, transnet_alone: bool) -> dict[str, scoring.Detector]:
    dets = {"ours": scoring.ours(ShotConfig(), opinion), "no-2nd": scoring.ours(ShotConfig(second_opinion="none")),
            "anchor": scoring.scenedetect_default("adaptive"), "content": scoring.scenedetect_default("content")}
    if transnet_alone:
        dets["transnet"] = scoring.transnet_alone(opinion.scorer)
    return dets


def _print_table(title: str, results: dict[str, dict], groups: list[str]) -> None:
    print(f"\n{title}  (F1 / detections inside a flash or distractor)")
    print(f"{'set':16s}" + "".join(f"{n:>14s}" for n in results) + f"{'cuts':>7s}")
    for g in groups:
        cuts = results["ours"][g]["tp"] + results["ours"][g]["fn"]
        print(f"{g:16s}" + "".join(f"{r[g]['f1']:9.3f} /{len(r[g]['splits']):3d}" for r in results.values())
              + f"{cuts:7d}")


def cpu_per_kiloframe(videos: dict[str, tuple], dets: dict[str, scoring.Detector], repeat: int) -> dict[str, float]:
    """CPU seconds per 1000 frames of each detector over `videos` (best of `repeat` per video)."""
    frames = sum(len(small) for small, _ in videos.values())
    out = {}
    for name, det in dets.items():
        total = 0.0
        for small, fps in videos.values():
            best = float("inf")
            for _ in range(repeat):
                t = time.process_time()
                det(small, fps)
                best = min(best, time.process_time() - t)
            total += best
        out[name] = 1000 * total / frames
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="all", help="dev, held-out, all, or a comma-separated list")
    parser.add_argument("--no-transnet-alone", action="store_true", help="skip TransNetV2 on every frame (slow)")
    parser.add_argument("--repeat", type=int, default=3, help="timing repeats per video (best is kept)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    truth = {k: v for k, v in json.loads((SHARED / "ground_truth.json").read_text()).items() if not k.startswith("_")}
    cfg = DecodeConfig(keep_frames=False)
    shared = {name: decode_video(SHARED / name, cfg) for name in truth}
    shared = {name: (v.small, v.fps) for name, v in shared.items()}
    opinion = SecondOpinion(ShotConfig())
    opinion.scorer  # load now: an actor loads it once, before its first source
    dets = _detectors(opinion, not args.no_transnet_alone)
    _print_table("shared clips", {n: scoring.evaluate(shared, truth, d, lambda _: "shared") for n, d in dets.items()},
                 ["shared"])
    summary = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, seeds in _seeds(args.seeds).items():
            sets_truth = build_sets(Path(tmp) / label, seeds, SHARED, truth)
            videos = {n: decode_video(Path(tmp) / label / n, cfg) for n in sets_truth}
            videos = {n: (v.small, v.fps) for n, v in videos.items()}
            results = {n: scoring.evaluate(videos, sets_truth, d, lambda v: sets_truth[v]["set"]) for n, d in dets.items()}
            _print_table(f"{label} seeds {list(seeds)}", results, [*SETS, "ALL"])
            summary[label] = {n: round(r["ALL"]["f1"], 4) for n, r in results.items()}
    costs = cpu_per_kiloframe(shared, {n: d for n, d in dets.items() if n != "transnet"}, args.repeat)
    print("\nCPU s per 1000 frames on the shared clips (best of %d): " % args.repeat
          + ", ".join(f"{n} {c:.2f}" for n, c in costs.items()))
    print(json.dumps({"f1_all": summary, "cpu_s_per_kiloframe": {n: round(c, 3) for n, c in costs.items()}}))


if __name__ == "__main__":
    main()
