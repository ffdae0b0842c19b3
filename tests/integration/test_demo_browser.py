"""The README followed literally in a fresh clone, and what a user then sees, checked in a real browser.

The commands of the README's "Two commands" block are read from README.md and run in order in a fresh
clone (the session fixture `demo` of conftest.py; clone_support: the venv is linked in place of `make
setup`'s install): `make demo` runs every step (curation, both training stages, generation through the
cascade, evaluation); run again, it finds every step complete and skips them all. (`make test`, the second
command, is the suite running this test.) test_readme_commands.py follows the rest of the README in the
same clone.

The browser is headless Chromium from Debian's packages (/usr/bin/chromium; `.ci/run` installs it), driven
by Playwright (never a downloaded browser); the tests skip, saying so, only where it is absent. They check:
the curation report's funnel numbers equal OUT/stats.json and every thumbnail loads; a plain `mlflow ui`
started in the clone opens each stage's experiment on its training runs (not MLflow 3's GenAI view), lists
the run, draws its `train/loss` chart, and plays a sample mp4 in a <video> element; the Ray dashboard of a
running local cluster lists a curation job submitted to it. Screenshots go to out/browser-screenshots/ of
the repository (printed at the end of each test).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from clone_support import CHROMIUM, REPO, clone_env, free_port, stage_runs, stop_group
from mlflow import MlflowClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SHOTS = REPO / "out" / "browser-screenshots"
needs_chromium = pytest.mark.skipif(not CHROMIUM.is_file(),
                                    reason="chromium not installed (apt-get install -y chromium): browser checks skipped")


def test_make_demo_runs_every_step_then_resumes_with_nothing_to_do(demo):
    clone, first, again = demo["clone"], demo["first"]["log"], demo["again"]["log"]
    steps = ("curate", "base", "refine", "generate", "evaluate", "evaluate-cascade")
    for step in steps:
        assert not _skipped(first, step) and f"{step} finished in" in first, first[-3000:]
        assert _skipped(again, step), again[-3000:]
    assert "demo finished" in again and "mlflow ui" in again
    video = clone / "out" / "demo" / "video.mp4"
    scores = json.loads((clone / "out" / "demo" / "eval" / "eval.json").read_text())
    assert video.stat().st_size > 0 and scores["means"]["motion"] is not None
    cascade = json.loads((clone / "out" / "demo" / "eval-cascade" / "eval.json").read_text())
    assert cascade["means"]["motion"] is not None and cascade["means"]["base/motion"] is not None
    assert (clone / "out" / "demo" / "eval-cascade" / "grid.mp4").stat().st_size > 0
    assert (clone / "out" / "curate-sample" / "report.html").is_file()
    assert (clone / "runs" / "tiny-base" / "export" / "stage.yaml").is_file()
    assert (clone / "runs" / "tiny-refine" / "export" / "stage.yaml").is_file()


def _skipped(log: str, step: str) -> bool:
    """The demo's line for `step` says it was complete already (recipe.demo prints `[i/n] step: ...`)."""
    return any(f"] {step}: " in line and line.endswith("done already, skipped") for line in log.splitlines())


# ------------------------------------------------------------------------------------------- browser
@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            yield b
        finally:
            b.close()


@needs_chromium
def test_report_funnel_equals_stats_and_thumbnails_load(demo, browser):
    out = demo["clone"] / "out" / "curate-sample"
    stats = json.loads((out / "stats.json").read_text())
    page = browser.new_page()
    page.goto((out / "report.html").as_uri())
    shown = dict(page.eval_on_selector_all(
        "[data-funnel]", "els => els.map(e => [e.getAttribute('data-funnel'), e.textContent.trim()])"))
    expected = {f"{kind}.{key}": str(value) for kind, counts in stats["funnel"].items()
                for key, value in counts.items()}
    assert shown and {k: shown[k] for k in expected if k in shown} == {k: v for k, v in expected.items() if k in shown}
    assert {"video.inputs", "video.kept", "image.kept"} <= set(shown)
    images = page.eval_on_selector_all("img", "els => els.map(e => e.complete && e.naturalWidth > 0)")
    assert images and all(images), images
    page.screenshot(path=str(SHOTS / "report.png"), full_page=True)
    print(f"screenshot: {SHOTS / 'report.png'}")


@pytest.fixture(scope="module")
def mlflow_ui(demo):
    clone, port = demo["clone"], free_port()
    log = open(demo["clone"].parent / "mlflow-ui.log", "w")
    # a plain `mlflow ui` in the clone (no store flags: it must find mlflow.db and mlruns by itself), on
    # loopback; one worker: four importing MLflow at once take ~50 s on 2 loaded cores
    ui = subprocess.Popen([str(REPO / ".venv/bin/mlflow"), "ui", "--host", "127.0.0.1", "--port", str(port),
                           "--workers", "1"], cwd=clone, env=clone_env(), stdout=log, stderr=subprocess.STDOUT,
                          start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert ui.poll() is None and time.monotonic() < deadline, Path(log.name).read_text()[-3000:]
                time.sleep(1)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_group(ui)
        log.close()


@needs_chromium
def test_mlflow_ui_opens_the_training_runs_with_loss_chart_and_playing_video(demo, browser, mlflow_ui):
    runs = stage_runs(MlflowClient(demo["uri"]))
    # the links the demo prints at its end, as a user opens them (the test's UI runs on another port)
    links = dict(line.split()[:2] for line in demo["again"]["log"].splitlines()
                 if line.strip().startswith(("base ", "refine ")) and "http://" in line)
    assert set(links) == {"base", "refine"}, demo["again"]["log"][-2000:]
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    for stage, (experiment, run) in runs.items():
        page.goto(links[stage].replace("http://127.0.0.1:5000", mlflow_ui))
        page.get_by_text(run.info.run_name).first.wait_for(timeout=60_000)
        page.screenshot(path=str(SHOTS / f"mlflow-{stage}-experiment.png"))
        # the training runs' view, not MLflow 3's GenAI one (its overview / traces pages)
        assert f"/experiments/{experiment.experiment_id}/runs" in page.url, page.url
        assert "workflowType=genai" not in page.url, page.url
    base_exp, base_run = runs["base"]
    page.goto(f"{mlflow_ui}/#/experiments/{base_exp.experiment_id}/runs/{base_run.info.run_id}"
              "?workflowType=machine_learning")
    page.get_by_role("tab", name="Model metrics").click()
    page.get_by_placeholder("Search metric charts").fill("train/loss")
    page.get_by_text("(train/loss)").first.wait_for(timeout=60_000)  # the chart's legend: the chart is drawn
    page.screenshot(path=str(SHOTS / "mlflow-base-loss.png"))
    client = MlflowClient(demo["uri"])
    mp4 = sorted(f.path for d in client.list_artifacts(base_run.info.run_id, "samples")
                 for f in client.list_artifacts(base_run.info.run_id, d.path) if f.path.endswith(".mp4"))[-1]
    page.goto(f"{mlflow_ui}/#/experiments/{base_exp.experiment_id}/runs/{base_run.info.run_id}/artifacts/{mp4}"
              "?workflowType=machine_learning")
    video = page.locator("video").first
    video.wait_for(timeout=60_000)
    state = page.wait_for_function(
        "() => { const v = document.querySelector('video'); if (!v) return null;"
        " v.muted = true; v.play(); return v.readyState >= 2 && v.videoWidth > 0 ? "
        "{w: v.videoWidth, h: v.videoHeight, d: v.duration} : null; }", timeout=60_000).json_value()
    assert state["w"] > 0 and state["d"] > 0, state
    page.wait_for_function("() => document.querySelector('video').currentTime > 0", timeout=30_000)
    page.screenshot(path=str(SHOTS / "mlflow-base-video.png"))
    print(f"screenshots: {sorted(p.name for p in SHOTS.glob('mlflow-*.png'))} in {SHOTS}")


@needs_chromium
def test_ray_dashboard_lists_the_curation_job(ray_cluster, browser, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    for name in ("tears_of_steel_frame_0040.jpg", "tears_of_steel_frame_0040.txt"):
        (inp / name).write_bytes((REPO / "tests/assets/sample" / name).read_bytes())
    submission = "curate-dashboard-check"
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_cluster["dashboard"],
           "--submission-id", submission, "--working-dir", ".", "--", "python", "-m", "pipeline.curate",
           "--input", str(inp), "--output", str(tmp_path / "out")]
    res = subprocess.run(cmd, env=ray_cluster["env"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(f"{ray_cluster['dashboard']}/#/jobs")
    page.get_by_text(submission).first.wait_for(timeout=60_000)
    page.screenshot(path=str(SHOTS / "ray-dashboard-jobs.png"))
    assert "pipeline.curate" in page.content()
    print(f"screenshot: {SHOTS / 'ray-dashboard-jobs.png'}")
