"""The whole recipe on the bundled sample, one step after the other: `make demo` (or `python -m recipe.demo`).

    curate     python -m pipeline.curate   tests/assets/sample -> out/curate-sample (shards, manifests, report.html)
    base       python -m training.train    configs/train/tiny-base.yaml   -> runs/tiny-base (MLflow run, export)
    refine     python -m training.train    configs/train/tiny-refine.yaml -> runs/tiny-refine (MLflow run, export)
    generate   python -m model.generate    the bundled image through both exports -> OUT/video.mp4
    evaluate   python -m training.evaluate the base export on the bundled prompts -> OUT/eval
    evaluate-cascade
               python -m training.evaluate the refine export after the base export (`--base`: the cascade,
                                           base and refined videos scored alike) -> OUT/eval-cascade

(the first three are what `make curate`, `make train-base` and `make train-refine` run, in the same folders)

Every step is the real command a user would run, in its own process (its own progress bar), with the tiny
random models built in code: a demo of the machinery on CPU, not of video quality. A step whose output is
complete is skipped, so running the demo again resumes where it stopped and a finished demo ends at once;
`--force` reruns everything. The environment of the Makefile is expected (loopback Ray, no telemetry, the
repo importable); `make demo` sets it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "tests" / "assets" / "sample"
SAMPLE_IMAGE = SAMPLE / "tears_of_steel_frame_0040.jpg"


@dataclass
class Step:
    """One step of the demo: a command, and how to tell that its output is already complete."""

    name: str
    what: str
    argv: list[str]
    done: Callable[[], bool]


def _exists(path: Path) -> Callable[[], bool]:
    return lambda: path.exists()


def _trained(folder: Path, recipe: str) -> Callable[[], bool]:
    """Complete when the samples of the recipe's last step were rendered: the trainer does that after the
    final checkpoint and export, last of all (an export alone may come from a mid-run sampling step)."""
    def done() -> bool:
        from training.config import load_config  # torch-free

        last = load_config(str(REPO / recipe), []).max_steps
        return (folder / "export" / "stage.yaml").is_file() and \
            any((folder / "samples" / f"step-{last:08d}").glob("*.mp4"))
    return done


CURATED = "out/curate-sample"  # where `make curate` writes and the tiny recipes read (data.shards)
RECIPES = {"base": "configs/train/tiny-base.yaml", "refine": "configs/train/tiny-refine.yaml"}


def output_dir(recipe: str) -> Path:
    """The recipe's output_dir (where `make train-base` / `make train-refine` write too)."""
    from training.config import load_config  # torch-free

    return REPO / load_config(str(REPO / recipe), []).output_dir


def steps(out: Path) -> list[Step]:
    """The demo's steps: the same commands and folders as `make curate`, `make train-base` and `make
    train-refine` (so either resumes the other's work), then generation and evaluation under `out`."""
    py = [sys.executable, "-m"]
    curate = REPO / CURATED
    base, refine = output_dir(RECIPES["base"]), output_dir(RECIPES["refine"])
    prompt = (SAMPLE_IMAGE.with_suffix(".txt")).read_text(encoding="utf-8").strip()
    return [
        Step("curate", "curate the bundled sample on a local Ray cluster",
             [*py, "pipeline.curate", "--input", str(SAMPLE.relative_to(REPO)), "--output", CURATED],
             _exists(curate / "stats.json")),
        Step("base", "train the tiny base stage (DeepSpeed, CPU; MLflow run in ./mlflow.db)",
             [*py, "training.train", "--config", RECIPES["base"]], _trained(base, RECIPES["base"])),
        Step("refine", "train the tiny refinement stage (DeepSpeed, CPU; MLflow run in ./mlflow.db)",
             [*py, "training.train", "--config", RECIPES["refine"]], _trained(refine, RECIPES["refine"])),
        Step("generate", "generate a video from the bundled image with the cascade of both exports",
             [*py, "model.generate", "--image", str(SAMPLE_IMAGE.relative_to(REPO)), "--prompt", prompt, "--base",
              str(base / "export"), "--refine", str(refine / "export"), "--out", str(out / "video.mp4"),
              "--device", "cpu"],
             _exists(out / "video.mp4")),
        # files only: the base run in MLflow already holds the same scores, evaluated at its last step
        Step("evaluate", "evaluate the base stage on the bundled prompts",
             [*py, "training.evaluate", "--checkpoint", str(base / "export"), "--out", str(out / "eval"),
              "--no-mlflow"],
             _exists(out / "eval" / "eval.json")),
        # files only too: the refine recipe does not evaluate during training (it would need the base export)
        Step("evaluate-cascade", "evaluate the cascade (base export, then the refine export) on the bundled prompts",
             [*py, "training.evaluate", "--checkpoint", str(refine / "export"), "--base", str(base / "export"),
              "--out", str(out / "eval-cascade"), "--no-mlflow"],
             _exists(out / "eval-cascade" / "eval.json")),
    ]


def run(out: Path, force: bool = False, only: list[str] | None = None) -> int:
    """Run the steps in order (skipping complete ones unless `force`); the first failing step stops the demo
    with its exit status."""
    todo = [s for s in steps(out) if not only or s.name in only]
    t_all = time.monotonic()
    for i, step in enumerate(todo, 1):
        head = f"[{i}/{len(todo)}] {step.name}: {step.what}"
        if step.done() and not force:
            print(f"{head}: done already, skipped", flush=True)
            continue
        print(f"{head}\n      $ {shlex.join(step.argv)}", flush=True)
        t0 = time.monotonic()
        rc = subprocess.run(step.argv, cwd=REPO).returncode
        if rc != 0:
            print(f"demo: step {step.name} failed with exit status {rc}; fix it and run the demo again "
                  "(finished steps are skipped)", file=sys.stderr)
            return rc
        print(f"      {step.name} finished in {time.monotonic() - t0:.0f} s", flush=True)
    print(summary(out, time.monotonic() - t_all), flush=True)
    return 0


def summary(out: Path, seconds: float) -> str:
    """Where to look once the demo has run."""
    lines = [f"demo finished in {seconds:.0f} s. Where to look:",
             f"  curation report   {REPO / CURATED / 'report.html'}  (funnel, scores, thumbnails)",
             f"  curated data      {REPO / CURATED}/shards, manifest/, stats.json",
             "  training runs     `.venv/bin/mlflow ui` in this folder, then (loss, samples, exports, evaluation):",
             *[f"                    {line}" for line in training_links()],
             f"  generated video   {out / 'video.mp4'}",
             f"  evaluation        {out / 'eval'}  (base stage)",
             *score_lines(out / "eval"),
             f"  cascade eval      {out / 'eval-cascade'}  (base -> refine; grid.mp4: image | base | refined)",
             *score_lines(out / "eval-cascade")]
    lines.append("All models here are tiny and random (built in code): the demo shows the machinery, not quality.")
    return "\n".join(lines)


def score_lines(folder: Path) -> list[str]:
    """The means of FOLDER/eval.json, indented under its summary line: one line, or for a cascade evaluation
    one for the refined video and one for the base video (its `base/<score>` keys)."""
    scores = folder / "eval.json"
    means = json.loads(scores.read_text()).get("means", {}) if scores.is_file() else {}
    # "base/": training.eval_cascade.BASE_PREFIX, spelled out here: importing that module loads torch
    groups = {"refined": {k: v for k, v in means.items() if not k.startswith("base/")},
              "base": {k[len("base/"):]: v for k, v in means.items() if k.startswith("base/")}}
    cascade = bool(groups["base"])
    lines = []
    for label, group in groups.items():
        shown = ", ".join(f"{k} {v:.3f}" for k, v in group.items() if isinstance(v, (int, float)))
        if shown:
            lines.append("                    " + (f"{label}: " if cascade else "") + shown)
    return lines


def training_links() -> list[str]:
    """UI links of the two stages' experiments in ./mlflow.db (the trainer's default store)."""
    from mlflow import MlflowClient

    from training.config import load_config
    from common.tracking_store import resolve_tracking_uri, sqlite_path, ui_link

    lines = []
    for stage, recipe in RECIPES.items():
        tracking = load_config(str(REPO / recipe), []).tracking
        uri = resolve_tracking_uri(tracking)  # where the trainer logged this stage
        db = sqlite_path(uri)
        if db is not None and not db.is_file():
            continue
        experiment = MlflowClient(uri).get_experiment_by_name(tracking.experiment or f"i2vgen-xl-{stage}")
        if experiment is not None:
            lines.append(f"{stage:7s} {ui_link(uri, experiment.experiment_id)}")
    return lines or ["(no runs found in the recipes' MLflow store)"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipe.demo", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    p.add_argument("--force", action="store_true", help="rerun every step, complete or not")
    p.add_argument("--only", nargs="+", choices=[s.name for s in steps(Path("x"))], help="run only these steps")
    args = p.parse_args(argv)
    return run((REPO / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out),
               args.force, args.only)


if __name__ == "__main__":
    sys.exit(main())
