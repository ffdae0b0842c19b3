"""Kill and resume: a run killed at any moment continues exactly where its newest complete checkpoint
left it, with the same losses and exactly the unseen remainder of the data.

1. 2 processes (torchrun, ZeRO-2): the whole job (launcher, both ranks, their loader workers) is SIGKILLed
   as soon as metrics.jsonl shows step 3; `--resume` (auto) continues from the step-2 checkpoint. Steps
   3..6 equal the uninterrupted reference run B (shared with test_train_deepspeed.py), and so do the
   samples of every step (keys and sample ids, i.e. epoch-exact positions on both ranks). Resuming that
   run with another batch size stops on the data position, before any model is built.
2. 1 process (ZeRO-3, UNet dropout 0.1, MLflow on a real SQLite store): the process kills itself inside the
   save of its second checkpoint (step 4), right after the first file (test-only launcher wrapping
   torch.save). The half-written step-4 folder is ignored; resume continues from step 2, re-does steps 3
   and 4 with exactly the losses of the killed run (dropout masks included: the global RNG states are in
   the checkpoint), writes a complete step 4 over the partial one, and logs into the same MLflow run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from train_support import (
    COMMON, TINY_BASE, ZERO3, base_args, curated_shards, finish, kill_job, launch, metrics, run, steps,
    two_process_zero2,
)

HERE = Path(__file__).resolve().parent
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _starts(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("event") == "start"]


def test_sigkill_of_the_job_then_resume_continues_exactly(tmp_path_factory, tmp_path):
    shards = curated_shards(tmp_path_factory)
    reference = steps(metrics(two_process_zero2(tmp_path_factory, shards)))
    out = tmp_path / "run"
    args = [*base_args(shards), "data.batch_size=1", "deepspeed.zero_stage=2", f"output_dir={out}"]
    proc = launch(args, nproc=2, log=tmp_path / "killed.log")
    try:
        deadline = time.monotonic() + 300
        while max(steps(metrics(out)), default=0) < 3:
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "step 3 never came"
            time.sleep(0.05)
    finally:
        kill_job(proc)  # SIGKILL to every process of the job at once
    killed = steps(metrics(out))
    assert max(killed) < 6 and (out / "checkpoints" / "step-00000002" / "COMPLETE").is_file()

    records = run(args[:-1], out, nproc=2)
    start = _starts(records)[-1]
    resumed_at = int(Path(start["resumed_from"]).name.split("-")[1])
    assert resumed_at in (2, 4) and resumed_at <= max(killed)
    after = {s: r for s, r in steps(records[records.index(start):]).items()}
    assert sorted(after) == list(range(resumed_at + 1, 7))
    for s in range(1, 7):
        got = killed[s] if s <= resumed_at else after[s]
        assert got["keys"] == reference[s]["keys"], s          # the same samples on the same ranks
        assert got["sample_ids"] == reference[s]["sample_ids"], s  # ... from the same epochs
        assert got["loss"] == reference[s]["loss"], s               # bit for bit: same world size and order
        assert got["lr"] == reference[s]["lr"], s

    # another micro-batch size does not fit the saved data position: every rank stops in the check the
    # trainer makes before building any model (Run.resume_state), naming the checkpoint and the mismatch
    log = tmp_path / "mismatch.log"
    rc = finish(launch([*args, "data.batch_size=2"], nproc=2, log=log), timeout=300)
    text = log.read_text()
    assert rc != 0
    assert "cannot resume from" in text and "step-00000006" in text and "data position does not fit" in text
    assert "batch_sizes" in text
    assert len(_starts(metrics(out))) == len(_starts(records))  # nothing was started


def test_kill_inside_a_checkpoint_save_resumes_from_the_previous_complete_one(tmp_path_factory, tmp_path):
    shards = curated_shards(tmp_path_factory)
    out = tmp_path / "run"
    store = tmp_path / "mlflow"
    store.mkdir()
    args = ["--config", TINY_BASE, f"data.shards=[{shards}]", "data.batch_size=2", *ZERO3,
            *[a for a in COMMON if not a.startswith("tracking.")], "tracking.enabled=true",
            f"tracking.tracking_uri=sqlite:///{store / 'mlflow.db'}",
            "tracking.system_metrics=false", f"output_dir={out}"]
    assert not any(a.startswith("model.overrides") for a in args)  # dropout 0.1, the recipe's default
    launcher = [str(HERE / "kill_during_save_launcher.py"), "step-00000004"]
    rc = finish(launch(args, nproc=1, module=launcher, log=tmp_path / "killed.log"), timeout=300)
    assert rc == -9, (tmp_path / "killed.log").read_text()[-3000:]  # it did die by SIGKILL, mid-save
    partial = out / "checkpoints" / "step-00000004"
    assert partial.is_dir() and any(partial.rglob("*.pt")) and not (partial / "COMPLETE").is_file()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    killed = steps(metrics(out))
    assert sorted(killed) == [1, 2, 3, 4]  # step 4 was logged, then its save died
    run_id = _mlflow_run_ids(store)
    assert len(run_id) == 1

    records = run(args[:-1], out, nproc=1)
    start = _starts(records)[-1]
    assert Path(start["resumed_from"]).name == "step-00000002"  # never the partial step-4 folder
    after = steps(records[records.index(start):])
    assert sorted(after) == [3, 4, 5, 6]
    for s in (3, 4):  # the killed run went through these uninterrupted
        assert after[s]["keys"] == killed[s]["keys"] and after[s]["sample_ids"] == killed[s]["sample_ids"]
        assert after[s]["loss"] == killed[s]["loss"], s
    assert len({after[s]["loss"] for s in after}) == 4
    assert (partial / "COMPLETE").is_file()  # rewritten complete
    marker = json.loads((partial / "COMPLETE").read_text())
    assert marker["step"] == 4
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000006"
    # MLflow: the resumed job logged into the run the killed one created
    assert _mlflow_run_ids(store) == run_id
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    history = client.get_metric_history(run_id[0], "train/loss")
    assert {m.step for m in history} == {1, 2, 3, 4, 5, 6}
    assert client.get_run(run_id[0]).info.status == "FINISHED"


def _mlflow_run_ids(store: Path) -> list[str]:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    exps = client.search_experiments()
    return sorted(r.info.run_id for e in exps for r in client.search_runs([e.experiment_id]))
