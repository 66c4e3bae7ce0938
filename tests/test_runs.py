"""Training runs end to end: a real trainer subprocess, a real engine, the real store.

The trainer here is a stand-in with the real interface: it runs a Python subprocess in its own
process group that logs and writes XTuner-style progress lines, then "converts" by writing a
model directory. The engine is the production Engine on the scripted backend (its answers
name the model serving them); the evaluator returns set scores chosen by each test and the
production `decide` rules on them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bot.settings import EngineSettings, Settings, TrainingSettings
from bot.store import ReportTarget, RunInProgress, RunStage, Store, TrainingRunRecord
from bot.training.evaluation import Evaluation, SampleResult
from bot.training.runs import ModelNotServing, RunSupervisor, run_directory
from bot.training.trainers.base import (
    Progress,
    ProgressCallback,
    TrainedModel,
    TrainingFailed,
    TrainingJob,
    read_progress,
)
from bot.training.trainers.process import group_alive, log_tail, run_logged
from engine.engine import Engine
from engine.types import ModelSpec
from tests.factories import add_photo, add_user, answered
from tests.scripted_backend import ScriptedBackend

REPO = Path(__file__).resolve().parent.parent
BASE_PATH = "/models/base"
ADMIN = "900"

# The trainer subprocess: one progress line per iteration, then a model directory.
TRAINER_SCRIPT = """
import json, pathlib, sys, time
scalars, total, step_s, status, output = sys.argv[1:]
total, step_s, status = int(total), float(step_s), int(status)
for iteration in range(1, total + 1):
    time.sleep(step_s)
    print(f"Iter(train) [{iteration}/{total}]  loss: {1 / iteration:.4f}", flush=True)
    with open(scalars, "a") as lines:
        lines.write(json.dumps({"iter": iteration, "loss": 1 / iteration, "time": step_s}) + "\\n")
if status:
    print("RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB", flush=True)
    sys.exit(status)
pathlib.Path(output).mkdir(parents=True)
(pathlib.Path(output) / "config.json").write_text("{}")
"""


@dataclass
class FakeTrainer:
    """A trainer with the real interface whose training is a small subprocess."""

    step_s: float = 0.02
    exit_status: int = 0
    name: str = "fake"
    jobs: list[TrainingJob] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)  # of the training subprocesses started

    async def train(self, job: TrainingJob, progress: ProgressCallback) -> TrainedModel:
        self.jobs.append(job)
        job.work_dir.mkdir(parents=True, exist_ok=True)
        scalars = job.work_dir / "scalars.json"
        command = [
            sys.executable,
            "-c",
            TRAINER_SCRIPT,
            str(scalars),
            str(job.total_iterations),
            str(self.step_s),
            str(self.exit_status),
            str(job.output_dir),
        ]
        status = await run_logged(
            command,
            log_path=job.log_path,
            on_start=lambda pid: self._started(pid, job),
            poll=lambda: progress(read_progress(scalars, "training", job.total_iterations)),
            poll_interval_s=0.05,
        )
        if status != 0:
            raise TrainingFailed(f"the trainer exited with status {status}", log_tail(job.log_path))
        progress(Progress("converting", 0, 1))
        progress(Progress("converting", 1, 1))
        return TrainedModel(job.output_dir, job.system_prompt, "chatml", notes=("fake trainer",))

    def _started(self, pid: int, job: TrainingJob) -> None:
        self.pids.append(pid)
        if job.on_process is not None:
            job.on_process(pid)


def scores(candidate: float, active: float) -> Evaluation:
    """An evaluation where the candidate scores ``candidate`` on what users taught it."""
    taught = SampleResult(
        "taught", "images/a.jpg", "这是什么菜？", "肠粉", "叉烧", "肠粉", active, candidate
    )
    kept = SampleResult(
        "kept", "images/b.jpg", "这是什么菜？", "云吞面", "云吞面", "云吞面", 1.0, 1.0
    )
    return Evaluation((taught, kept))


def evaluator(
    result: Evaluation, seen: list[dict[str, Any]] | None = None
) -> Callable[..., Awaitable[Evaluation]]:
    async def evaluate(**arguments: Any) -> Evaluation:
        if seen is not None:
            seen.append(arguments)
        arguments["progress"](1, 2)
        return result

    return evaluate


def settings_for(data_dir: Path) -> Settings:
    return Settings(
        data_dir=data_dir,
        admins=[f"telegram:{ADMIN}"],
        engine=EngineSettings(model=BASE_PATH),
        training=TrainingSettings(epochs=2, batch_size=1, accumulative_counts=1),
    )


async def add_feedback(store: Store, photos: int = 6) -> None:
    """Approved answers about ``photos`` different photos: something to train on."""
    asker = await add_user(store, "1")
    rater = await add_user(store, "2")
    for n in range(photos):
        photo = await add_photo(store, color=(20 * n, 80, 40))
        exchange = await answered(store, asker, photo=photo, answer=f"菜 {n}")
        await store.record_rating(exchange.id, rater.id, 1)


@dataclass
class Bench:
    """What a test of runs works with."""

    store: Store
    settings: Settings
    engine: Engine
    trainer: FakeTrainer
    told: list[TrainingRunRecord]
    supervisor: RunSupervisor
    admin_id: int

    async def start(self, **options: Any) -> int:
        return await self.supervisor.start(
            self.admin_id, ReportTarget("telegram", ADMIN, "77"), **options
        )

    async def until(
        self, check: Callable[[TrainingRunRecord], bool], run_id: int, timeout_s: float = 20
    ) -> TrainingRunRecord:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            run = await self.store.get_training_run(run_id)
            if run is not None and check(run):
                return run
            await asyncio.sleep(0.05)
        raise AssertionError(f"run {run_id} never got there: {run}")


def make_supervisor(
    store: Store,
    settings: Settings,
    engine: Engine,
    trainer: FakeTrainer,
    told: list[TrainingRunRecord],
    result: Evaluation | None = None,
) -> RunSupervisor:
    async def notify(run: TrainingRunRecord) -> None:
        told.append(run)

    return RunSupervisor(
        store,
        settings,
        engine,
        lambda _settings: trainer,
        evaluator=evaluator(result or scores(candidate=1.0, active=0.0)),
        notify=notify,
        candidate_engine=lambda spec: Engine(ScriptedBackend(), spec),
        progress_interval_s=0.1,
    )


@pytest.fixture
async def bench(store: Store, data_dir: Path) -> AsyncIterator[Bench]:
    settings = settings_for(data_dir)
    await add_feedback(store)
    admin = await add_user(store, ADMIN)
    trainer = FakeTrainer()
    told: list[TrainingRunRecord] = []
    async with Engine(ScriptedBackend(), ModelSpec(BASE_PATH, "base")) as engine:
        supervisor = make_supervisor(store, settings, engine, trainer, told)
        try:
            yield Bench(store, settings, engine, trainer, told, supervisor, admin.id)
        finally:
            await supervisor.close()


async def ask(engine: Engine) -> str:
    from engine.engine import Request

    handle = await engine.submit(Request(key="telegram:1", question="这是什么菜？", images=()))
    return (await handle.result()).model


async def test_a_run_exports_trains_evaluates_and_promotes_and_the_engine_serves_it(
    bench: Bench,
) -> None:
    bench.trainer.step_s = 0.05
    run_id = await bench.start()
    run = await bench.supervisor.wait(run_id)

    assert run.stage is RunStage.DONE, run.error
    version = await bench.store.active_model_version()
    assert version is not None
    assert version.name == f"run-{run_id}"
    assert run.model_version_id == version.id
    assert (version.trainer, version.run_id, version.template) == ("fake", run_id, "chatml")
    assert version.parent_id == (await bench.store.get_model_version("base")).id  # type: ignore[union-attr]
    assert version.evaluation["summary"]["taught"] == {"count": 1, "active": 0.0, "candidate": 1.0}  # type: ignore[index]
    assert run.evaluation == version.evaluation
    assert Evaluation.from_json(run.evaluation) == scores(candidate=1.0, active=0.0)  # type: ignore[arg-type]
    assert run.decision
    # the engine swapped, and new answers come from the new version
    assert bench.engine.model.name == version.name
    assert await ask(bench.engine) == version.name
    # files where the architecture says, and the trainer was given what it needs
    run_dir = run_directory(bench.settings, run_id).resolve()
    assert run.run_dir == str(run_dir)
    assert (run_dir / "export" / "train.jsonl").exists()
    assert (run_dir / "model" / "config.json").exists()
    assert "Iter(train)" in (run_dir / "train.log").read_text()
    job = bench.trainer.jobs[0]
    assert job.base_model == BASE_PATH
    assert job.output_dir == run_dir / "model"
    assert job.total_iterations == 12  # 6 photos, 2 epochs, batch 1
    assert "fake trainer" in run.notes
    # whoever started it saw every stage, progress on the way, and the end
    stages = [told.stage for told in bench.told]
    for stage in (
        RunStage.EXPORTING,
        RunStage.TRAINING,
        RunStage.CONVERTING,
        RunStage.EVALUATING,
        RunStage.PROMOTING,
    ):
        assert stage in stages
    assert stages[-1] is RunStage.DONE
    training = [t.progress for t in bench.told if t.progress.get("stage") == "training"]
    assert any(p["iteration"] > 0 and p["total"] == 12 and p["loss"] for p in training), training
    assert all(t.report_to == ReportTarget("telegram", ADMIN, "77") for t in bench.told)


async def test_a_trainer_that_fails_ends_the_run_with_its_log_tail_and_the_model_stays(
    bench: Bench,
) -> None:
    bench.trainer.exit_status = 3

    run = await bench.supervisor.wait(await bench.start())

    assert run.stage is RunStage.FAILED
    assert "exited with status 3" in (run.error or "")
    assert "CUDA out of memory" in (run.error or "")
    assert (await bench.store.active_model_version()).name == "base"  # type: ignore[union-attr]
    assert bench.engine.model.name == "base"
    assert bench.told[-1].stage is RunStage.FAILED
    assert await bench.store.running_training_run() is None  # the slot is free again


async def test_a_second_start_while_one_runs_is_refused_with_its_progress(bench: Bench) -> None:
    bench.trainer.step_s = 0.3
    run_id = await bench.start()
    await bench.until(
        lambda r: r.progress.get("stage") == "training" and r.progress["iteration"] >= 1, run_id
    )

    with pytest.raises(RunInProgress) as refused:
        await bench.start()

    assert refused.value.run.id == run_id
    assert refused.value.run.stage is RunStage.TRAINING
    assert refused.value.run.progress["iteration"] >= 1
    assert f"/{refused.value.run.progress['total']}" in str(refused.value)
    await bench.supervisor.cancel(run_id)


async def test_cancel_ends_the_run_and_the_trainers_process_group_within_seconds(
    bench: Bench,
) -> None:
    bench.trainer.step_s = 0.5
    run_id = await bench.start()
    running = await bench.until(lambda r: r.trainer_pgid is not None, run_id)
    assert running.trainer_pgid is not None
    assert group_alive(running.trainer_pgid)

    started = time.monotonic()
    cancelled = await bench.supervisor.cancel(run_id)

    assert cancelled.stage is RunStage.CANCELLED
    assert time.monotonic() - started < 5
    assert not group_alive(running.trainer_pgid)
    assert bench.told[-1].stage is RunStage.CANCELLED
    assert (await bench.store.active_model_version()).name == "base"  # type: ignore[union-attr]


async def test_cancel_from_another_process_stops_the_supervised_run(
    bench: Bench, database_url: str, data_dir: Path
) -> None:
    bench.trainer.step_s = 0.5
    run_id = await bench.start()
    running = await bench.until(lambda r: r.trainer_pgid is not None, run_id)
    cli_store = Store.open(database_url, data_dir)
    try:
        cli = make_supervisor(cli_store, bench.settings, bench.engine, FakeTrainer(), [])
        cli.pid = -1  # as another process on this host sees it
        cancelled = await cli.cancel(run_id)
    finally:
        await cli_store.close()

    assert cancelled.stage is RunStage.CANCELLED
    assert not group_alive(running.trainer_pgid)  # type: ignore[arg-type]
    ended = await bench.supervisor.wait(run_id)
    assert ended.stage is RunStage.CANCELLED
    assert bench.told[-1].stage is RunStage.CANCELLED


async def test_a_worse_candidate_is_rejected_and_the_active_model_stays(bench: Bench) -> None:
    bench.supervisor = make_supervisor(
        bench.store,
        bench.settings,
        bench.engine,
        bench.trainer,
        bench.told,
        scores(candidate=0.0, active=1.0),
    )

    run = await bench.supervisor.wait(await bench.start())

    assert run.stage is RunStage.REJECTED
    assert run.decision
    assert run.evaluation["summary"]["taught"]["candidate"] == 0.0  # type: ignore[index]
    assert run.model_version_id is None
    assert (await bench.store.active_model_version()).name == "base"  # type: ignore[union-attr]
    assert bench.engine.model.name == "base"
    assert await ask(bench.engine) == "base"


async def test_force_promotes_a_worse_candidate_anyway(bench: Bench) -> None:
    bench.supervisor = make_supervisor(
        bench.store,
        bench.settings,
        bench.engine,
        bench.trainer,
        bench.told,
        scores(candidate=0.0, active=1.0),
    )

    run = await bench.supervisor.wait(await bench.start(force=True))

    assert run.stage is RunStage.DONE
    assert run.force
    assert "force" in (run.decision or "")
    assert bench.engine.model.name == f"run-{run.id}"


async def test_a_dry_run_exports_and_reports_the_plan_without_training(bench: Bench) -> None:
    run = await bench.supervisor.wait(await bench.start(dry_run=True))

    assert run.stage is RunStage.DONE
    assert run.dry_run
    assert "dry run" in (run.decision or "")
    assert "iterations" in (run.decision or "")
    assert bench.trainer.jobs == []
    assert (Path(run.run_dir or "") / "export" / "train.jsonl").exists()
    assert (await bench.store.active_model_version()).name == "base"  # type: ignore[union-attr]


async def test_nothing_to_train_on_fails_the_run_saying_so(store: Store, data_dir: Path) -> None:
    told: list[TrainingRunRecord] = []
    async with Engine(ScriptedBackend(), ModelSpec(BASE_PATH, "base")) as engine:
        supervisor = make_supervisor(store, settings_for(data_dir), engine, FakeTrainer(), told)
        run = await supervisor.wait(await supervisor.start(None, None))

    assert run.stage is RunStage.FAILED
    assert "nothing to train on" in (run.error or "")


async def test_two_bots_starting_runs_at_once_get_one_run(
    bench: Bench, database_url: str, data_dir: Path
) -> None:
    other_store = Store.open(database_url, data_dir)
    other = make_supervisor(other_store, bench.settings, bench.engine, FakeTrainer(step_s=0.3), [])
    other.host = "another-bot"  # a second bot process, on a host of its own
    bench.trainer.step_s = 0.3
    try:
        outcomes = await asyncio.gather(
            bench.start(), other.start(None, None), return_exceptions=True
        )
        started = [o for o in outcomes if isinstance(o, int)]
        refused = [o for o in outcomes if isinstance(o, RunInProgress)]
        assert len(started) == 1, outcomes
        assert len(refused) == 1, outcomes
        assert refused[0].run.id == started[0]
        await bench.supervisor.cancel(started[0])
        await other.cancel(started[0])
    finally:
        await other.close()
        await other_store.close()


# -- the bot killed mid-training ---------------------------------------------------------

CHILD = """
import asyncio, sys
from tests.test_runs import supervise_until_killed
asyncio.run(supervise_until_killed(sys.argv[1], sys.argv[2]))
"""


async def supervise_until_killed(database_url: str, data_dir: str) -> None:
    """The bot's side, in a process of its own: start a slow run and keep supervising it."""
    store = Store.open(database_url, Path(data_dir))
    async with Engine(ScriptedBackend(), ModelSpec(BASE_PATH, "base")) as engine:
        admin = await store.find_user("telegram", ADMIN)
        assert admin is not None
        supervisor = make_supervisor(
            store, settings_for(Path(data_dir)), engine, FakeTrainer(step_s=1.0), []
        )
        await supervisor.start(admin.id, ReportTarget("telegram", ADMIN, "77"))
        await asyncio.Event().wait()


async def test_a_bot_killed_mid_training_leaves_no_stuck_run_after_it_restarts(
    bench: Bench, database_url: str, data_dir: Path
) -> None:
    bot = await asyncio.create_subprocess_exec(
        *[sys.executable, "-c", CHILD, database_url, str(data_dir)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        run = await bench.until(
            lambda r: r.trainer_pgid is not None and r.progress.get("iteration", 0) >= 1, 1
        )
        assert run.pid == bot.pid
        bot.send_signal(signal.SIGKILL)
        await asyncio.wait_for(bot.wait(), 10)
        assert run.trainer_pgid is not None
        assert group_alive(run.trainer_pgid)  # the orphaned trainer goes on, holding the GPU

        recovered = await bench.supervisor.recover()  # the bot, started again

        assert recovered is not None
        assert recovered.id == run.id
        assert recovered.stage is RunStage.FAILED
        assert "restarted" in (recovered.error or "")
        assert not group_alive(run.trainer_pgid)
        assert bench.told == [recovered]  # the admin who started it is told
        assert recovered.report_to == ReportTarget("telegram", ADMIN, "77")
        assert await bench.store.running_training_run() is None
        assert await bench.supervisor.recover() is None
    finally:
        if bot.returncode is None:
            bot.kill()
            await bot.wait()


async def test_a_run_whose_supervisor_went_quiet_is_recovered_when_a_new_run_is_asked(
    bench: Bench,
) -> None:
    stale = await bench.store.create_training_run(host="another-host", pid=1)
    bench.supervisor.stale_after_s = 0.0

    run_id = await bench.start(dry_run=True)

    assert run_id != stale.id
    ended = await bench.store.get_training_run(stale.id)
    assert ended is not None
    assert ended.stage is RunStage.FAILED
    assert "another-host" in (ended.error or "")
    await bench.supervisor.wait(run_id)


async def test_a_cancel_while_promoting_lets_the_promotion_finish_so_all_agree(
    store: Store, data_dir: Path
) -> None:
    settings = settings_for(data_dir)
    await add_feedback(store)
    admin = await add_user(store, ADMIN)
    told: list[TrainingRunRecord] = []
    # Loading a model takes a while here, so the cancel lands during the swap.
    async with Engine(ScriptedBackend(load_s=0.5), ModelSpec(BASE_PATH, "base")) as engine:
        supervisor = make_supervisor(store, settings, engine, FakeTrainer(), told)
        try:
            run_id = await supervisor.start(admin.id, ReportTarget("telegram", ADMIN, "77"))

            # Cancel once the new version is active in the database, while the engine swaps.
            async def activated() -> None:
                while True:
                    active = await store.active_model_version()
                    if active is not None and active.name == f"run-{run_id}":
                        return
                    await asyncio.sleep(0.01)

            await asyncio.wait_for(activated(), 20)
            run = await supervisor.cancel(run_id)
        finally:
            await supervisor.close()
        active = await store.active_model_version()

        assert run.stage is RunStage.DONE, "too late to cancel: the promotion went through"
        assert active is not None
        assert active.name == f"run-{run_id}"
        assert engine.model.name == active.name, "the engine serves what the database says"


async def test_a_run_is_not_promoted_over_a_version_activated_while_it_trained(
    bench: Bench,
) -> None:
    bench.trainer.step_s = 0.2
    await bench.store.add_model_version("hand-picked", BASE_PATH)
    run_id = await bench.start()
    await bench.until(lambda r: r.stage is RunStage.TRAINING, run_id)

    await bench.store.activate_model_version("hand-picked")
    run = await bench.supervisor.wait(run_id)

    assert run.stage is RunStage.REJECTED
    assert run.decision == (
        "the active model changed to hand-picked during the run; retrain from it"
    )
    assert (await bench.store.active_model_version()).name == "hand-picked"  # type: ignore[union-attr]


async def test_the_trainers_process_group_is_recorded_as_it_starts_even_without_proc(
    bench: Bench, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As on a system without /proc: only the trainer's own word says which group it runs.
    monkeypatch.setattr("bot.training.runs._child_group_leaders", lambda parent: [])
    bench.trainer.step_s = 0.3
    run_id = await bench.start()
    try:
        running = await bench.until(lambda r: r.trainer_pgid is not None, run_id, timeout_s=5)
    finally:
        await bench.supervisor.cancel(run_id)

    assert bench.trainer.pids
    assert running.trainer_pgid == bench.trainer.pids[0]
    assert not group_alive(bench.trainer.pids[0]), "and cancelling stopped it"


async def test_no_run_starts_while_the_served_model_is_not_answering_yet(
    store: Store, data_dir: Path
) -> None:
    # dishbot run is still downloading its model: an evaluation now would score an active
    # model that cannot answer, and promote into an engine not started.
    settings = settings_for(data_dir)
    trainer = FakeTrainer()
    async with Engine(ScriptedBackend(), ModelSpec(BASE_PATH, "base")) as engine:
        supervisor = RunSupervisor(
            store,
            settings,
            engine,
            lambda _settings: trainer,
            model_ready=lambda: "downloading the model org/model, 42% of 2.1 GB",
        )
        try:
            with pytest.raises(ModelNotServing, match=r"42% of 2\.1 GB"):
                await supervisor.start(None, None)
        finally:
            await supervisor.close()

    assert await store.training_runs(limit=5) == []
    assert trainer.jobs == []
