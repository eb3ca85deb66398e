"""The server's queue: one worker thread per device runs generation jobs in arrival order, and merges jobs that can
share a U-Net batch (the same model, size, steps, sampler, schedule, guidance and LoRAs) arriving within a short window
into one batch. Image i of a job stays the image its seed gives alone: every image has its own generator.

A job can be cancelled at any time (its client left, or its time ran out): a waiting job is dropped when its turn
comes, a running one stops at the next step unless it shares the batch with jobs still wanted. Other work on the
device (the extras tab's upscales) takes its turn among the jobs (`Call`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..pipeline.generate import NonFiniteError, Progress, decode, generate_plan
from ..pipeline.images import to_pil
from ..pipeline.loading import Pipeline
from ..pipeline.plan import Plan, infotext, infotext_fields, merge, resolve
from ..pipeline.request import GenerationRequest, RequestError


class QueueFull(Exception):
    pass


class Interrupted(Exception):
    pass


@dataclass(kw_only=True)
class Task:
    """What the worker does for a client: it sets `error` if it failed, then `done`, then calls `notify`."""

    done: threading.Event = field(default_factory=threading.Event)
    notify: Callable[[], None] | None = None  # called from the worker thread when done
    cancelled: bool = False  # the client no longer wants it
    error: Exception | None = None


@dataclass
class Job(Task):
    """One request waiting for (or run by) the worker."""

    request: GenerationRequest  # as the client gave it (validated without a model)
    checkpoint: Path | None  # the model it runs on (None: whichever is loaded)
    refiner: Path | None = None  # the checkpoint that denoises the end of its schedule (the web UI's refiner)
    hires_checkpoint: Path | None = None  # the checkpoint of its hires pass (the web UI's hr_checkpoint_name)
    batch_size: int = 1  # images per U-Net call when run alone
    merge: bool = True  # may share a U-Net batch with other jobs
    sampler_name: str = ""  # as the client named it, for its answer
    cfg_scale: float | None = None  # guidance where neither the request nor the model's file gives one
    paste: Callable[[Any], Any] = lambda image: image  # lays a result into the client's picture (inpainting)
    # Filled by the worker:
    plan: Plan | None = None  # resolved against the pipeline it runs on (by the server on arrival, if that is loaded)
    model_path: Path | None = None  # the checkpoint of the model it ran on
    images: list = field(default_factory=list)  # PIL images
    infotexts: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    batched_with: int = 1  # jobs in the U-Net batch it ran in
    interrupted: bool = False

    @property
    def resolved(self) -> GenerationRequest:
        """The request as it runs: its defaults filled in (a job run as a `Call`, SD upscale's, keeps it as `request`)."""
        return self.plan.request if self.plan is not None else self.request

    def request_for(self, pipeline: Pipeline) -> GenerationRequest:
        """The request with the job's guidance where neither the request nor the model's file gives one."""
        if self.request.cfg_scale is None and pipeline.model.cfg.cfg_scale is None:
            return dataclasses.replace(self.request, cfg_scale=self.cfg_scale)
        return self.request

    def resolve(self, pipeline: Pipeline) -> None:
        """Its plan for this pipeline, unless it has one already (the server resolves it on arrival)."""
        plan = self.plan
        if plan is None or _models(plan.pipeline) != _models(pipeline):
            self.plan = resolve(self.request_for(pipeline), pipeline)

    def shares_batches(self) -> bool:
        """Whether it may share U-Net batches at all (not with init images, nor one call per batch_size)."""
        r = self.resolved
        return self.merge and r.init_image is None and self.batch_size == len(r.prompts)

    def key(self) -> tuple | None:
        """Jobs of equal keys can share U-Net batches; None: runs alone."""
        if not self.shares_batches():
            return None
        return (*_checkpoints(self), *self.plan.batch_key())


@dataclass
class Load(Task):
    """Make a checkpoint the loaded model (the web UI's `sd_model_checkpoint` option)."""

    checkpoint: Path


@dataclass
class Call(Task):
    """Other work on the device, in its turn among the jobs (the extras tab's upscales, as the web UI runs them under
    its queue lock): `work(pipeline)` on the loaded pipeline, its return value kept in `result`."""

    work: Callable[[Pipeline], Any]
    result: Any = None


class Worker:
    """The one thread that runs jobs on the model, and what `/progress` reads of the job running now."""

    def __init__(
        self, pipeline: Pipeline, load: Callable[[Path], Pipeline], *, max_queue: int, max_batch: int, window: float
    ):
        self.pipeline, self.load = pipeline, load
        self.refiner: Pipeline | None = None  # the last refiner a job asked for, kept for the next
        self.hires: Pipeline | None = None  # the last hires checkpoint (hr_checkpoint_name) a job asked for, kept too
        self.max_queue, self.max_batch, self.window = max_queue, max_batch, window
        self.jobs: queue.Queue[Task | None] = queue.Queue()  # None: stop
        self.lock = threading.Lock()  # guards `waiting`
        self.waiting = 0  # jobs queued or running
        # The running job, for /progress:
        self.running: list[Job] = []
        self.step = self.steps = self.part = self.parts = 0
        self.latent = None  # the x0 estimate of the step just done, first image of the batch: (1, 4, h, w)
        self.started = 0.0
        self.interrupted = self.skipped = False  # (skipped: the running batch only)
        self.before_job: Callable[[], None] | None = None  # run before each job (the models back on their device)
        self.thread = threading.Thread(target=self.run, daemon=True, name="ldm-serve-worker")
        self.thread.start()

    def submit(self, job: Task) -> None:
        with self.lock:
            if self.waiting >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} jobs); try again later")
            self.waiting += 1
        self.jobs.put(job)

    def interrupt(self) -> None:
        """Stop the running job (not the waiting ones) at its next step; it answers with what it has. A batch that
        several clients' jobs share runs on: the web UI's API names no job, so an interrupt cannot tell whose it is,
        and one client must not cut short the images of others (the web UI runs one job at a time)."""
        if len(self.running) == 1:
            self.interrupted = True

    def skip(self) -> None:
        """End the running job's current U-Net batch at its next step, with its images as far as they got; the job
        goes on with its next batch (the web UI's skip). Not a batch that several clients' jobs share."""
        if len(self.running) == 1:
            self.skipped = True

    def stop(self) -> None:
        self.jobs.put(None)

    def run(self) -> None:
        """Takes jobs in arrival order. A job that can share a U-Net batch waits up to `window` seconds for others
        that can (equal `Job.key`), up to `max_batch` images, and they run as one request. Ends at a None."""
        carried = None
        while (first := carried or self.jobs.get()) is not None:
            carried = None
            if isinstance(first, Load):  # (one whose client has gone is not loaded)
                self.finish([first], lambda load: load.cancelled or self.switch(load), first)
                continue
            if isinstance(first, Call):  # (nor is one run)
                self.finish([first], self.call, first)
                continue
            group = [first]
            if self.prepare(first) and first.key() is not None:
                deadline = time.monotonic() + self.window
                while sum(len(j.request.prompts) for j in group) < self.max_batch:
                    try:
                        job = self.jobs.get(timeout=max(0.0, deadline - time.monotonic()))
                    except queue.Empty:
                        break
                    if job is None:
                        self.jobs.put(None)  # stop after this group
                        break
                    if not self.mergeable(group, job):
                        carried = job  # the next group starts with it: the order is kept
                        break
                    group.append(job)
            self.finish(group, self.run_group, [j for j in group if j.error is None and not j.cancelled])

    def finish(self, group: list, work: Callable, argument: Any) -> None:
        """Run `work(argument)`; its error goes to each client of the group; then release them."""
        try:
            work(argument)
        except Exception as e:  # the worker goes on
            for job in group:
                job.error = job.error or e
        finally:
            with self.lock:
                self.waiting -= len(group)
            for job in group:
                job.done.set()
                if job.notify is not None:
                    with contextlib.suppress(RuntimeError):  # its event loop has closed (the server stopping)
                        job.notify()

    def call(self, task: Call) -> None:
        if not task.cancelled:
            task.result = task.work(self.pipeline)

    def switch(self, load: Load) -> None:
        """Load another checkpoint; the old model serves on if it cannot be loaded."""
        if self.pipeline.checkpoint is None or self.pipeline.checkpoint.resolve() != load.checkpoint.resolve():
            self.pipeline = self.load(load.checkpoint)

    def prepare(self, job: Job) -> bool:
        """Load the job's model if another is loaded, and validate the job against it (its error goes to it)."""
        if job.cancelled:
            return False
        try:
            if self.before_job is not None:
                self.before_job()
            if job.checkpoint is not None:
                self.switch(Load(job.checkpoint))
            for name, wanted in (("refiner", job.refiner), ("hires", job.hires_checkpoint)):
                if wanted is not None and not _is_of(getattr(self, name), wanted):
                    setattr(self, name, None)  # (the old one's memory is free before the new one loads)
                    setattr(self, name, self.load(wanted))
            job.resolve(self.pipeline_of(job))
            job.model_path = self.pipeline.checkpoint
        except Exception as e:
            job.error = e
            return False
        return True

    def pipeline_of(self, job: Job) -> Pipeline:
        """The loaded pipeline, with the refiner and the hires checkpoint the job asked for (loaded by `prepare`)."""
        pipeline = self.pipeline
        if job.refiner is not None:
            pipeline = dataclasses.replace(
                pipeline, refiner=self.refiner.model, refiner_checkpoint=self.refiner.checkpoint
            )
        if job.hires_checkpoint is not None:
            pipeline = dataclasses.replace(pipeline, hires_pipeline=self.hires)
        return pipeline

    def mergeable(self, group: list[Job], job: Task) -> bool:
        if not isinstance(job, Job) or _checkpoints(job) != _checkpoints(group[0]):
            return False
        if job.cancelled or not self.prepare(job):
            return True  # it rides along and is answered with its error, or dropped
        images = sum(len(j.request.prompts) for j in group) + len(job.request.prompts)
        return job.key() == group[0].key() and images <= self.max_batch

    def run_group(self, group: list[Job], again: bool = False) -> None:
        """Run the jobs as one U-Net batch. again: a job of a group that failed together, run on its own now (an
        interrupt of the group still holds)."""
        if not group:
            return
        if not again:
            self.interrupted, self.started = False, time.monotonic()
        self.running = group
        try:
            if len(group) == 1:
                job = group[0]
                sizes = [job.batch_size] * (len(job.request.prompts) // job.batch_size)
                job.images, job.infotexts, job.warnings = self.execute(job.plan, sizes)
            else:
                try:  # the batch's memory (and so its VAE tiling) is checked for all its images together
                    merged = merge([j.plan for j in group])
                    images, infotexts, warnings = self.execute(merged, [len(merged.request.prompts)])
                except (RequestError, NonFiniteError):  # too large together, or one went NaN: each job alone, so
                    for job in group:  # that each gets its own answer (and its own seeds in an error)
                        try:
                            self.run_group([job], again=True)
                        except Exception as e:
                            job.error = e
                    return
                start = 0
                for job in group:
                    n = len(job.request.prompts)
                    job.images, job.infotexts = images[start : start + n], infotexts[start : start + n]
                    job.warnings, job.batched_with = warnings, len(group)
                    start += n
            for job in group:
                job.interrupted = self.interrupted
        finally:
            self.running = []

    def execute(self, plan: Plan, sizes: list[int]) -> tuple[list, list[str], list[str]]:
        """Run a plan in parts of these sizes -> (PIL images, infotexts, warnings); stops early
        on an interrupt, or when every job of the batch is cancelled. An interrupted batch answers, as the web UI's,
        with the images its last step's x0 estimate decodes to."""
        images, infotexts, warnings, start = [], [], [], 0
        self.parts, estimate, pipeline = len(sizes), None, plan.pipeline

        def step_done(p: Progress) -> None:
            nonlocal estimate
            self.step, self.steps, estimate = p.step, p.total, p.sampler_step.denoised
            self.latent = estimate[:1].to(pipeline.model.dtype)
            if self.interrupted or self.skipped or all(j.cancelled for j in self.running):
                raise Interrupted

        try:
            for self.part, size in enumerate(sizes):
                self.step, estimate, self.skipped = 0, None, False
                part = plan.part(start, start + size)
                start += size
                try:
                    result = generate_plan(part, progress=step_done)
                except Interrupted:
                    if estimate is not None and not all(j.cancelled for j in self.running):
                        with torch.no_grad():
                            decoded = decode(pipeline.model, estimate, tiled=bool(part.request.vae_tiling))
                        images += [to_pil((image / 2 + 0.5).clamp(0, 1)) for image in decoded]
                        fields = infotext_fields(part)
                        infotexts += [infotext(part.request, i, fields) for i in range(len(part.request.prompts))]
                    if self.skipped:  # (the web UI's skip: this batch ends as it is, the next one runs)
                        continue
                    break
                images += [to_pil(t) for t in result.images]
                infotexts += result.infotexts
                warnings += [w for w in result.warnings if w not in warnings]
        finally:
            self.step = self.steps = self.part = self.parts = 0
            self.latent = None
        return images, infotexts, warnings


def _models(pipeline: Pipeline) -> tuple:
    """The models a plan is resolved against: the model, its refiner and its hires checkpoint's model."""
    hires = pipeline.hires_pipeline
    return pipeline.model, pipeline.refiner, hires.model if hires else None


def _is_of(pipeline: Pipeline | None, checkpoint: Path) -> bool:
    return pipeline is not None and pipeline.checkpoint.resolve() == checkpoint.resolve()


def _checkpoints(job: Job) -> tuple:
    return job.checkpoint, job.refiner, job.hires_checkpoint
