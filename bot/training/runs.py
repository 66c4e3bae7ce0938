"""The run: one retraining, from the export to a promoted (or rejected) model, never stuck.

A run is a row (`bot.store.TrainingRunRecord`) that moves through its stages:

    queued → exporting → training → converting → evaluating → promoting
           → done | rejected | failed | cancelled

The database holds one unfinished run at a time, whichever process asks. The process that
started a run supervises it: it runs the trainer's subprocess, writes every stage change and
(at most every ``progress_interval_s``) the progress to the row, and calls ``notify`` with the
row each time, so the chat adapters and the CLI can edit one progress message. A run's files
live under ``<training.work_dir>/runs/<id>/``: ``export/``, ``work/``, ``train.log``, ``model/``.

When the supervising process dies (SIGKILL, a crash, a host that went away), `recover` in the
next process finds the run whose supervisor is gone, stops the trainer it left behind, marks
the run failed with the reason, and tells whoever started it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from bot.errors import DishbotError, NotFound
from bot.settings import Settings
from bot.store import (
    ModelVersionRecord,
    ReportTarget,
    RunInProgress,
    RunStage,
    Store,
    TrainingRunRecord,
)
from bot.store.models import utcnow
from bot.store.store import RunEnded, process_alive
from bot.training import evaluation as gate
from bot.training.export.dataset import export_dataset
from bot.training.export.errors import ExportError
from bot.training.export.options import ExportOptions
from bot.training.export.xtuner_config import iterations_per_run
from bot.training.trainers.base import (
    Progress,
    TrainedModel,
    Trainer,
    TrainingFailed,
    TrainingJob,
)
from bot.training.trainers.process import STOP_GRACE_S, group_alive, log_tail, stop_group
from bot.training.versions import VersionFollower, ensure_base_version, model_spec
from engine.engine import Engine
from engine.errors import EngineError
from engine.prompts import system_prompt_for
from engine.types import ModelSpec

__all__ = [
    "RunInProgress",
    "RunSupervisor",
    "run_directory",
]

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 2.0  # the fastest a run's row (and its progress message) changes
HEARTBEAT_S = 10.0  # a supervisor touches its run at least this often
STALE_AFTER_S = 60.0  # a run untouched this long has lost its supervisor
VERSION_PREFIX = "run-"

Notify = Callable[[TrainingRunRecord], Awaitable[None]]
TrainerFactory = Callable[[Settings], Trainer]
# `bot.training.evaluation.evaluate` and `decide`, or stand-ins with their signatures.
Evaluator = Callable[..., Awaitable[gate.Evaluation]]
Decider = Callable[..., gate.Decision]
CandidateEngine = Callable[[ModelSpec], Engine]


def run_directory(settings: Settings, run_id: int) -> Path:
    """Where a run keeps its files: ``<training.work_dir>/runs/<id>``."""
    return settings.training_dir / "runs" / str(run_id)


@dataclass
class _Live:
    """What a running run's reporter knows between writes."""

    run: TrainingRunRecord
    progress: dict[str, Any] | None = None  # newest progress not yet written
    stage: RunStage | None = None  # a stage the trainer reported (converting)
    written_at: float = 0.0
    # The supervisor and its reporter write the row in turns, so a stage never goes back.
    writing: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    trainer_group: int | None = None  # as the trainer reported it (`TrainingJob.on_process`)


class ModelNotServing(DishbotError):
    """A run cannot start: the model it would be compared with is not answering yet."""


class RunSupervisor:
    """Starts, supervises, cancels and recovers training runs (see the module docstring).

    ``trainer_factory(settings)`` makes the trainer; ``evaluator`` and ``decider`` default to
    the evaluation gate's `evaluate` and `decide`; ``candidate_engine(spec)`` builds the
    engine that serves the candidate during evaluation (default: `build_engine`);
    ``follower``, when given, is how the promoted version reaches ``engine``.
    """

    def __init__(
        self,
        store: Store,
        settings: Settings,
        engine: Engine,
        trainer_factory: TrainerFactory,
        *,
        evaluator: Evaluator | None = None,
        decider: Decider | None = None,
        notify: Notify | None = None,
        follower: VersionFollower | None = None,
        candidate_engine: CandidateEngine | None = None,
        progress_interval_s: float = PROGRESS_INTERVAL_S,
        stale_after_s: float = STALE_AFTER_S,
        model_ready: Callable[[], str | None] | None = None,
    ) -> None:
        """``model_ready`` (a serving process's): None when ``engine``'s model answers, else
        why not; a run is refused until it does, or its evaluation would score an active
        model that cannot answer (and promote the candidate into an engine not started)."""
        self.store = store
        self._model_ready = model_ready
        self.settings = settings
        self.engine = engine
        self._trainer_factory = trainer_factory
        self._evaluator = evaluator or gate.evaluate
        self._decider = decider or gate.decide
        self._notify = notify
        self._follower = follower
        self._candidate_engine = candidate_engine or self._build_candidate_engine
        self.progress_interval_s = progress_interval_s
        self.stale_after_s = stale_after_s
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self._tasks: dict[int, asyncio.Task[TrainingRunRecord]] = {}
        self._writes: set[asyncio.Future[None]] = set()
        self._closing = False

    # -- the public API -------------------------------------------------------------------

    async def start(
        self,
        requested_by: int | None,
        report_to: ReportTarget | None,
        *,
        force: bool = False,
        dry_run: bool = False,
    ) -> int:
        """Claim the one training slot with a new run and start it in the background.

        ``force`` promotes whatever the evaluation says; ``dry_run`` exports and reports the
        plan without training. Raises `RunInProgress` (with the running run and its progress)
        when another run holds the slot, `ConfigError` when no trainer fits the settings, and
        `ModelNotServing` while the served model is not ready.
        """
        not_ready = self._model_ready() if self._model_ready is not None else None
        if not_ready is not None:
            raise ModelNotServing(f"the model is not answering yet ({not_ready})")
        trainer = self._trainer_factory(self.settings)
        base = await ensure_base_version(self.store, self.settings)
        claim: dict[str, Any] = {
            "requested_by": requested_by,
            "report_to": report_to,
            "trainer": trainer.name,
            "force": force,
            "dry_run": dry_run,
            "host": self.host,
            "pid": self.pid,
            "parameters": self.settings.training.model_dump(mode="json"),
            "base_version_id": base.id,
        }
        try:
            run = await self.store.create_training_run(**claim)
        except RunInProgress as busy:
            if await self._recover_run(busy.run) is None:
                raise
            run = await self.store.create_training_run(**claim)
        log.info("training run %d started (%s, from %s)", run.id, trainer.name, base.name)
        task = asyncio.create_task(
            self._supervise(run, trainer, base), name=f"training-run-{run.id}"
        )
        self._tasks[run.id] = task
        task.add_done_callback(lambda _task: self._tasks.pop(run.id, None))
        return run.id

    async def wait(self, run_id: int, poll_s: float = 1.0) -> TrainingRunRecord:
        """Wait for a run to end (here or in another process) and return how it ended."""
        task = self._tasks.get(run_id)
        if task is not None:
            await asyncio.wait({task})
        while True:
            run = await self._get(run_id)
            if run.finished:
                return run
            await asyncio.sleep(poll_s)

    async def cancel(self, run_id: int) -> TrainingRunRecord:
        """Cancel a run, wherever it is supervised, and return it as it ended.

        A run of this process stops at once (the trainer's whole process group with it). A
        run of another process is marked cancelled; that process notices within seconds and
        stops its trainer, and when its supervisor is gone the trainer is stopped from here.
        """
        task = self._tasks.get(run_id)
        if task is not None:
            task.cancel()
            await asyncio.wait({task})
            return await self._get(run_id)
        run = await self._get(run_id)
        if run.finished:
            return run
        if run.stage is RunStage.PROMOTING and not self._supervisor_gone(run):
            return await self.wait(run_id)  # too late: the new version is being activated
        ended = await self.store.finish_training_run(
            run_id, RunStage.CANCELLED, error="cancelled by an admin"
        )
        if self._supervisor_gone(run):
            await self._stop_trainer(run)
            await self._tell(ended)
        else:
            await self._wait_for_trainer_to_stop(run)
        return ended

    async def recover(self) -> TrainingRunRecord | None:
        """End the running run if its supervising process is gone, and return it (else None).

        Call it when the bot starts (and whenever a run seems stuck): the trainer process
        group it left behind is stopped, the run is marked failed with the reason, and
        ``notify`` is called so that whoever started it is told.
        """
        run = await self.store.running_training_run()
        if run is None:
            return None
        return await self._recover_run(run)

    async def close(self) -> None:
        """Stop this process's runs (marked failed: the bot shut down during them)."""
        self._closing = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    # -- recovery -------------------------------------------------------------------------

    def _supervisor_gone(self, run: TrainingRunRecord) -> bool:
        if run.id in self._tasks:
            return False
        # On this host: this very pid without the run's task is a restarted bot given the
        # same pid (a container's pid 1); another pid must still be alive.
        if run.host == self.host and (
            run.pid == self.pid or run.pid is None or not process_alive(run.pid)
        ):
            return True
        return utcnow() - run.updated_at > timedelta(seconds=self.stale_after_s)

    async def _recover_run(self, run: TrainingRunRecord) -> TrainingRunRecord | None:
        if not self._supervisor_gone(run):
            return None
        if run.host == self.host:
            reason = f"the bot restarted during the run (it was {run.stage})"
        else:
            reason = (
                f"the process supervising the run (pid {run.pid} on {run.host}) stopped "
                f"answering during {run.stage}"
            )
        log.warning("training run %d: %s; marking it failed", run.id, reason)
        await self._stop_trainer(run)
        ended = await self.store.finish_training_run(run.id, RunStage.FAILED, error=reason)
        if ended.stage is RunStage.FAILED and ended.error == reason:
            await self._tell(ended)
        return ended

    async def _stop_trainer(self, run: TrainingRunRecord) -> None:
        if run.trainer_pgid is None or run.host != self.host:
            return
        if group_alive(run.trainer_pgid):
            log.warning(
                "stopping the trainer left behind by run %d (group %d)", run.id, run.trainer_pgid
            )
            await stop_group(run.trainer_pgid)

    async def _wait_for_trainer_to_stop(self, run: TrainingRunRecord) -> None:
        if run.host != self.host:
            return
        deadline = time.monotonic() + HEARTBEAT_S + STOP_GRACE_S
        while time.monotonic() < deadline:
            current = await self._get(run.id)
            pgid = current.trainer_pgid
            if pgid is None or not group_alive(pgid):
                return
            await asyncio.sleep(0.2)

    # -- one run, supervised --------------------------------------------------------------

    async def _supervise(
        self, run: TrainingRunRecord, trainer: Trainer, base: ModelVersionRecord
    ) -> TrainingRunRecord:
        live = _Live(run)
        reporter = asyncio.create_task(self._report(live, asyncio.current_task()))
        try:
            ended = await self._steps(live, trainer, base)
        except asyncio.CancelledError:
            if self._closing:
                ended = await self._end(
                    live, RunStage.FAILED, error="the bot shut down during the run"
                )
            else:
                ended = await self._end(live, RunStage.CANCELLED, error="cancelled by an admin")
        except RunEnded as gone:
            ended = gone.run
        except TrainingFailed as failure:
            ended = await self._end(
                live, RunStage.FAILED, error=_with_tail(str(failure), failure.log_tail)
            )
        except (DishbotError, EngineError) as failure:
            ended = await self._end(live, RunStage.FAILED, error=str(failure))
        except Exception as failure:
            log.exception("training run %d failed", run.id)
            tail = log_tail(Path(live.run.log_path)) if live.run.log_path else ""
            ended = await self._end(live, RunStage.FAILED, error=_with_tail(repr(failure), tail))
        finally:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
        log.info(
            "training run %d ended: %s %s", run.id, ended.stage, ended.error or ended.decision or ""
        )
        await self._tell(ended)
        return ended

    async def _steps(
        self, live: _Live, trainer: Trainer, base: ModelVersionRecord
    ) -> TrainingRunRecord:
        run_dir = run_directory(self.settings, live.run.id).resolve()
        export_dir = run_dir / "export"
        log_path = run_dir / "train.log"
        await asyncio.to_thread(run_dir.mkdir, parents=True, exist_ok=True)
        await self._advance(live, RunStage.EXPORTING, run_dir=str(run_dir), log_path=str(log_path))

        # The export's XTuner config names the model to fine-tune: the one serving now.
        training = self.settings.training.model_copy(update={"base_model": base.path})
        summary = await export_dataset(
            self.store,
            self.settings.model_copy(update={"training": training}),
            export_dir,
            ExportOptions(),
            progress=lambda done, total: self._progress(live, "exporting", done, total),
        )
        if summary.train_samples == 0:
            raise ExportError("nothing to train on yet: no feedback qualifies for training")
        gpus = self.settings.training.gpus if trainer.name == "xtuner" else 1
        total = iterations_per_run(summary.train_samples, self.settings.training, gpus)
        plan = (
            f"{summary.train_samples} training and {summary.val_samples} held-out samples; "
            f"{total} iterations with the {trainer.name} trainer from version {base.name}"
        )
        if live.run.dry_run:
            return await self._end(live, RunStage.DONE, decision=f"dry run: would train on {plan}")

        await self._advance(live, RunStage.TRAINING, notes=[f"exported {plan}"])
        job = TrainingJob(
            export_dir=export_dir,
            work_dir=run_dir / "work",
            output_dir=run_dir / "model",
            log_path=log_path,
            base_model=base.path,
            system_prompt=system_prompt_for(model_spec(base)),
            total_iterations=total,
            max_tiles=self.engine.config.max_tiles,
            training=self.settings.training,
            on_process=lambda group: self._trainer_started(live, group),
        )
        trained = await trainer.train(job, lambda progress: self._trainer_progress(live, progress))
        if live.stage is RunStage.CONVERTING and live.run.stage is RunStage.TRAINING:
            await self._advance(live, RunStage.CONVERTING, progress=live.progress)
        await self._advance(
            live, RunStage.EVALUATING, output_path=str(trained.path), notes=list(trained.notes)
        )

        name = f"{VERSION_PREFIX}{live.run.id}"
        evaluation = await self._evaluate(live, _candidate_version(name, trained), export_dir)
        await self._advance(live, RunStage.PROMOTING)
        decision = self._decider(evaluation, self.settings.training, force=live.run.force)
        stored = evaluation.to_json()
        active = await self.store.active_model_version()
        if active is None or active.id != base.id:
            # Trained from, and compared with, a model that no longer answers (an activate
            # or a rollback meanwhile): promoting it would silently replace that choice.
            changed = active.name if active is not None else "none"
            reason = f"the active model changed to {changed} during the run; retrain from it"
            return await self._end(live, RunStage.REJECTED, evaluation=stored, decision=reason)
        if not decision.promote:
            return await self._end(
                live, RunStage.REJECTED, evaluation=stored, decision=decision.reason
            )
        # Once the new version is active, the run must see the promotion through: a cancel
        # or a shutdown now would leave the database and the engines disagreeing.
        promotion = asyncio.ensure_future(self._promote(live, name, trainer, trained, base, stored))
        try:
            version = await asyncio.shield(promotion)
        except asyncio.CancelledError:
            version = await promotion
            log.warning("training run %d: cancelled while promoting; promoted first", live.run.id)
        return await self._end(
            live,
            RunStage.DONE,
            evaluation=stored,
            decision=decision.reason,
            model_version_id=version.id,
        )

    async def _evaluate(
        self, live: _Live, candidate: ModelVersionRecord, export_dir: Path
    ) -> gate.Evaluation:
        async with self._candidate_engine(model_spec(candidate)) as candidate_engine:
            return await self._evaluator(
                active=self.engine,
                candidate=candidate_engine,
                export_dir=export_dir,
                store=self.store,
                training=self.settings.training,
                progress=lambda done, total: self._progress(live, "evaluating", done, total),
            )

    async def _promote(
        self,
        live: _Live,
        name: str,
        trainer: Trainer,
        trained: TrainedModel,
        base: ModelVersionRecord,
        evaluation: dict[str, Any],
    ) -> ModelVersionRecord:
        summary = evaluation["summary"]
        version = await self.store.add_model_version(
            name,
            str(trained.path),
            parent_id=base.id,
            trainer=trainer.name,
            run_id=live.run.id,
            system_prompt=trained.system_prompt,
            template=trained.template,
            evaluation=evaluation,
            metrics={set_name: summary[set_name]["candidate"] for set_name in summary},
        )
        await self.store.activate_model_version(name, reason="promote")
        try:
            if self._follower is not None:
                await self._follower.sync()
            else:
                await self.engine.swap_model(model_spec(version))
        except EngineError as failure:
            previous = await self.store.rollback_model_version()
            raise DishbotError(
                f"the new model could not be loaded ({failure}); {previous.name} is active again"
            ) from failure
        log.info("training run %d: promoted %s", live.run.id, name)
        return version

    # -- writing the row ------------------------------------------------------------------

    async def _advance(self, live: _Live, stage: RunStage, **changes: Any) -> None:
        async with live.writing:
            live.run = await self.store.update_training_run(live.run.id, stage=stage, **changes)
            live.written_at = time.monotonic()
        await self._tell(live.run)

    async def _end(self, live: _Live, stage: RunStage, **results: Any) -> TrainingRunRecord:
        async with live.writing:
            live.run = await self.store.finish_training_run(live.run.id, stage, **results)
        return live.run

    def _progress(self, live: _Live, stage: str, done: int, total: int) -> None:
        # May be called from a worker thread: only plain assignments here.
        live.progress = {
            "stage": stage,
            "iteration": done,
            "total": total,
            "loss": None,
            "eta_s": None,
        }

    def _trainer_progress(self, live: _Live, progress: Progress) -> None:
        live.progress = {
            "stage": progress.stage,
            "iteration": progress.iteration,
            "total": progress.total,
            "loss": progress.loss,
            "eta_s": progress.eta_s,
        }
        if progress.stage == "converting":
            live.stage = RunStage.CONVERTING

    async def _report(self, live: _Live, supervised: asyncio.Task[Any] | None) -> None:
        """Write the newest progress every interval, keep the heartbeat, and notice a cancel
        from another process (the row ended): then stop the supervised task."""
        while True:
            await asyncio.sleep(self.progress_interval_s)
            try:
                await self._report_once(live)
            except RunEnded:
                log.info("training run %d was ended elsewhere; stopping it", live.run.id)
                if supervised is not None:
                    supervised.cancel()
                return
            except Exception:
                log.exception("could not record the progress of training run %d", live.run.id)

    def _trainer_started(self, live: _Live, group: int) -> None:
        """Record the trainer's process group at once: a supervisor killed a moment later
        must leave behind what the next one needs to stop it."""
        live.trainer_group = group
        write = asyncio.ensure_future(self._record_trainer_group(live))
        self._writes.add(write)
        write.add_done_callback(self._writes.discard)

    async def _record_trainer_group(self, live: _Live) -> None:
        try:
            await self._report_once(live)
        except Exception:  # the reporter writes it on its next turn, or the run has ended
            log.debug("training run %d: trainer group not recorded yet", live.run.id, exc_info=True)

    async def _report_once(self, live: _Live) -> None:
        async with live.writing:
            told = await self._write_progress(live)
        if told:
            await self._tell(live.run)

    async def _write_progress(self, live: _Live) -> bool:
        if live.run.finished:
            return False
        progress, live.progress = live.progress, None
        stage = (
            live.stage if live.stage is not None and live.run.stage is RunStage.TRAINING else None
        )
        pgid = (
            _reported_or_new_group(live.trainer_group, live.run.trainer_pgid)
            if live.run.stage in _TRAINER_STAGES
            else None
        )
        heartbeat_due = time.monotonic() - live.written_at >= HEARTBEAT_S
        if progress is None and stage is None and pgid is None and not heartbeat_due:
            current = await self._get(live.run.id)
            if current.finished:
                raise RunEnded(current)
            return False
        live.run = await self.store.update_training_run(
            live.run.id, stage=stage, progress=progress, trainer_pgid=pgid
        )
        live.written_at = time.monotonic()
        return progress is not None or stage is not None

    async def _tell(self, run: TrainingRunRecord) -> None:
        if self._notify is None:
            return
        try:
            await self._notify(run)
        except Exception:
            log.exception("could not report the progress of training run %d", run.id)

    async def _get(self, run_id: int) -> TrainingRunRecord:
        run = await self.store.get_training_run(run_id)
        if run is None:
            raise NotFound(f"training run {run_id} does not exist")
        return run

    def _build_candidate_engine(self, spec: ModelSpec) -> Engine:
        from bot.engine_setup import build_engine

        return build_engine(self.settings, spec)


_TRAINER_STAGES = frozenset({RunStage.TRAINING, RunStage.CONVERTING})


def _candidate_version(name: str, trained: TrainedModel) -> ModelVersionRecord:
    """The version a candidate would become, to serve it the same way during evaluation."""
    now = utcnow()
    return ModelVersionRecord(
        id=0,
        name=name,
        path=str(trained.path),
        parent_id=None,
        trainer=None,
        run_id=None,
        system_prompt=trained.system_prompt,
        template=trained.template,
        evaluation=None,
        metrics={},
        is_active=False,
        created_at=now,
        activated_at=None,
    )


def _with_tail(message: str, tail: str) -> str:
    return f"{message}\n{tail}" if tail else message


def _reported_or_new_group(reported: int | None, known: int | None) -> int | None:
    """The trainer's process group if it is not the one recorded yet, else None."""
    if reported is not None:
        return reported if reported != known else None
    return _new_trainer_group(known)


def _new_trainer_group(known: int | None) -> int | None:
    """A process group this process started since ``known`` (the trainer's), or None.

    For a trainer that does not report its subprocesses (`TrainingJob.on_process`): they
    run as the leaders of new sessions (`run_logged`), so the group is read from /proc, a
    child of this process that leads its own group. Where there is no /proc nothing is
    found, and a restart can then not stop a trainer left behind.
    """
    groups = _child_group_leaders(os.getpid())
    fresh = [group for group in groups if group != known]
    if known is not None and known in groups:
        return None
    return fresh[-1] if fresh else None


def _child_group_leaders(parent: int) -> list[int]:
    leaders = []
    try:
        entries = list(Path("/proc").iterdir())
    except OSError:
        return []
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may hold spaces and parentheses: split after its end.
        fields = stat[stat.rindex(")") + 2 :].split()
        ppid, group = int(fields[1]), int(fields[2])
        if ppid == parent and group == int(entry.name):
            leaders.append(group)
    return sorted(leaders)
