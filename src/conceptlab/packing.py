"""Packed sweeps (`hydra/launcher=packed`): the jobs of a sweep that share a backbone train in one
process, with one batched UNet (and text-encoder) pass per step.

Each job is still a whole job: Hydra's `run_job` runs train.py's task in a thread of its own, handed the
job's `Member` (`pack=`), with its own Lightning trainer, callbacks, run record, checkpoints, concept
files, loggers and W&B run. The task loads its backbone through the member and builds a
`PackedConceptModule`, whose steps go through the pack; nothing else of training knows of packs. The
threads take turns (one runs at a time, the next in job order when it waits; each has its own random
state and Hydra config) and meet twice per step: every job's training_step hands its batch to the pack,
which runs one pass over all of them and gives each its own loss, and every job's backward hands that
loss back, which runs one backward for all (both in the launcher's thread, the one that computes with
every core). The frozen backbone is loaded once; each job gets a copy of
its module tree that shares every weight, and its method installs itself there as it would alone (so
its sampling and evaluation are its own). In the shared pass each job's samples go through the job's
own modules where its method acts (`Method.packed_modules`) and through the one shared layer
everywhere else; no layer of the UNet mixes samples, so a job's loss and gradients are those it would
get alone, up to float rounding. A job that fails (a NaN loss, a bad image folder) leaves the pack and
fails alone; a job that is done leaves it; the others go on.

Jobs that cannot share a pass (another backbone or resolution, several devices, `trainer.compile`, a
method without `packed_modules`) form packs of their own; `pack_size` bounds a pack (memory).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import os
import pickle
import random
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn
from tqdm.auto import tqdm

from .backbone import Backbone, load_backbone
from .console import logging_around_bars
from .errors import TrainingError
from .hydra_callbacks import end_sweep
from .methods import Method, registered_methods
from .module import ConceptModule, diffusion_losses

log = logging.getLogger(__name__)
# One core for a job's own work (its sampling, its optimizer), every core for the shared pass: OpenMP
# keeps a team of workers per thread that computes, and more of them than cores slows every parallel
# region. torch's setting is the process's, so each side sets its own when it runs.
JOB_THREADS = 1
JOB_LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's job log format


# ------------------------------------------------------------------------------------------ launcher


def launch_packed(launcher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[JobReturn]:
    """The packed launcher's work (hydra_plugins.conceptlab_launcher): compose every job, pack them, run
    the packs one after another (a pack of one as Hydra's local launcher would), then end the sweep.
    Each job of a pack gets its Member as the task function's `pack` argument."""
    setup_globals()
    config, context = launcher.config, launcher.hydra_context
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    jobs = []
    for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
        job = context.config_loader.load_sweep_config(config, list(overrides))
        with open_dict(job):
            job.hydra.job.id = idx
            job.hydra.job.num = idx
        jobs.append(job)
    packs = plan_packs(jobs, launcher.pack_size)
    log.info("Launching %d jobs in %d pack(s) of at most %d", len(jobs), len(packs), launcher.pack_size)

    def run(job: DictConfig, member: Member | None) -> JobReturn:
        task = (
            launcher.task_function
            if member is None
            else functools.partial(launcher.task_function, pack=member)
        )
        return run_job(
            hydra_context=context, task_function=task, config=job, job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir", configure_logging=member is None,
        )  # fmt: skip

    returns: dict[int, JobReturn] = {}
    for pack in packs:
        for job in pack:
            log.info("\t#%d : %s", job.hydra.job.num, " ".join(filter_overrides(job.hydra.overrides.task)))
        results = [run(pack[0], None)] if len(pack) == 1 else Pack(pack, run).run()
        returns.update(zip((int(job.hydra.job.num) for job in pack), results))
        configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    end_sweep(config, sweep_dir)
    return [returns[num] for num in sorted(returns)]


def pack_key(config: DictConfig) -> str | None:
    """What the jobs of one pack share (backbone, resolution, precision, device); None: the job runs alone."""
    try:
        method = registered_methods().get(str(config.method.name))
        if method is None or method.packed_modules is Method.packed_modules:
            return None  # the method does not say where it acts
        trainer = config.trainer
        one_device = str(trainer.get("devices", 1)) == "1" and str(trainer.get("num_nodes", 1)) == "1"
        if not one_device or trainer.get("strategy", "auto") not in ("auto", None) or trainer.get("compile"):
            return None
        if trainer.get("gradient_checkpointing"):  # recomputed after the shared pass, outside it
            return None
        if config.data.get("buckets"):  # its batches' sizes change from step to step
            return None
        if config.data.get("num_workers", 0):
            return None  # forked data-loader workers and the pack's threads do not mix
        if config.hydra.job.get("chdir"):
            return None  # the working directory is the process's, not a thread's
        model = OmegaConf.to_container(config.model, resolve=True)
    except Exception:  # noqa: BLE001 - a setting only the job can judge: it runs alone, and says so there
        return None
    shared = {
        "model": model,
        "resolution": config.data.get("resolution"),
        "precision": str(trainer.get("precision")),
        "accelerator": str(trainer.get("accelerator")),
    }
    return json.dumps(shared, sort_keys=True, default=str)


def plan_packs(jobs: list[DictConfig], pack_size: int) -> list[list[DictConfig]]:
    """Jobs grouped by pack_key (in job order), each group cut into packs of at most pack_size."""
    groups: dict[str, list[DictConfig]] = {}
    alone: list[list[DictConfig]] = []
    for config in jobs:
        key = pack_key(config)
        if key is None:
            alone.append([config])
        else:
            groups.setdefault(key, []).append(config)
    packs = [group[i : i + pack_size] for group in groups.values() for i in range(0, len(group), pack_size)]
    return sorted(packs + alone, key=lambda pack: int(pack[0].hydra.job.num))


# -------------------------------------------------------------------------------------------- a pack


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (`kill`) stops a pack as Ctrl-C does: every job recorded as interrupted. (Lightning
    handles SIGTERM for a job in the main thread; a pack's jobs run in threads of their own.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _modes() -> tuple[bool, list[tuple[str, torch.dtype]]]:
    """This thread's grad mode and autocast settings (both are per thread)."""
    autocast = [
        (device, torch.get_autocast_dtype(device))
        for device in ("cpu", "cuda")
        if torch.is_autocast_enabled(device)
    ]
    return torch.is_grad_enabled(), autocast


class PackStopped(SystemExit):
    """The sweep was interrupted (Ctrl-C, SIGTERM) while this job waited for its turn: the job ends as interrupted,
    its record written (Lightning's own KeyboardInterrupt handling works in the main thread only)."""

    def __init__(self) -> None:
        super().__init__(130)

    def __str__(self) -> str:
        return "the packed sweep was interrupted (Ctrl-C or SIGTERM) while this job waited for its turn"


class _NoBar:
    def close(self) -> None:
        """Nothing to close: the pack draws no bar (trainer.enable_progress_bar=false)."""


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


class Pack:
    """Jobs trained together: their threads, turns, and the shared pass."""

    def __init__(self, jobs: list[DictConfig], run_job_fn: Callable[[DictConfig, Member], JobReturn]):
        self.run_job_fn = run_job_fn
        # One lock; each job's thread and the pack's own wait on conditions of their own, woken one at a
        # time (waking every thread at every turn would cost more than the turn).
        self.lock = threading.Lock()
        self.cv = threading.Condition(self.lock)  # the pack's thread: a shared pass to run, or all done
        self.members = [Member(self, index, config) for index, config in enumerate(jobs)]
        self.alive = list(range(len(jobs)))
        self.turn: int | None = 0
        self.requests: dict[str, dict[int, Any]] = {"forward": {}, "backward": {}}
        self.results: dict[tuple[str, int], Any] = {}
        self.work: tuple | None = None  # a shared pass for the pack's thread to run
        # The shared pass's threads: the process's setting when the pack starts (the jobs set their own).
        self.threads = torch.get_num_threads()
        self.lead: Backbone | None = None  # loaded once, never changed by a method: the shared pass runs here
        self.split_paths: set[str] = set()
        self.lead_cast = False
        self.tokenizer_blob: bytes | None = None  # the lead's tokenizers, pickled in this process
        self.data_memo: dict = {}  # latents and text contexts of the jobs' images, computed once (data.py)
        self.passing: list[tuple[Member, slice]] = []  # who is in the running pass, and where
        self._slices: dict[tuple, tuple[torch.Tensor, list[torch.Tensor]]] = {}
        self._runs: dict[str, list[tuple[nn.Module, slice]]] = {}
        self.pass_memo: dict = {}  # what grouped modules keep for the rest of one pass (packed_group)
        self.stopped: BaseException | None = None
        self.bar: tqdm | None = None  # the pack's one progress bar: every job's steps

    def run(self) -> list[JobReturn]:
        """Start the jobs' threads, run the shared passes they ask for here, in this thread (the one
        thread that computes them: a thread's own OpenMP team would contend with the others' on a CPU),
        and return when every job has ended."""
        threads = [
            threading.Thread(target=self._job, args=(m,), name=f"job-{m.config.hydra.job.num}", daemon=True)
            for m in self.members
        ]
        self.bar = self._progress_bar()
        # The jobs' own warnings.catch_warnings() interleave: the filters are restored here, once.
        with (
            warnings.catch_warnings(),
            _terminate_as_interrupt(),
            logging_around_bars(),
            contextlib.closing(self.bar or _NoBar()),
        ):
            for thread in threads:
                thread.start()
            try:
                with self.lock:
                    while self.alive:
                        self.cv.wait_for(lambda: self.work is not None or not self.alive, timeout=1.0)
                        if self.work is not None:
                            self._do_work()
            except KeyboardInterrupt as stop:
                with self.lock:
                    self.stopped = stop
                    for m in self.members:
                        m.cv.notify()
                # Each job ends at its next turn and records itself as interrupted (a second Ctrl-C stops
                # waiting for them).
                for thread in threads:
                    thread.join(timeout=120)
                raise
            for thread in threads:
                thread.join()
        return [m.job_return for m in self.members]

    def _progress_bar(self) -> tqdm | None:
        """One bar for the pack: its jobs' optimizer steps together (its jobs draw none of their own)."""
        trainers = [m.config.get("trainer") or {} for m in self.members]
        if not all(t.get("enable_progress_bar", True) and t.get("max_steps") for t in trainers):
            return None  # off, or jobs that are not training runs (the pack's own tests)
        total = sum(int(t["max_steps"]) for t in trainers)
        return tqdm(
            total=total,
            desc=f"pack of {len(trainers)} jobs",
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
        )

    def _show_progress(self, steps: int) -> None:
        """`steps` more job steps, and the best score so far among the jobs (their records' evidence)."""
        if self.bar is None:
            return
        records = [m.record for m in self.members if m.record is not None]
        evidence = next((r.summary.evidence[0] for r in records if r.summary.evidence), None)
        scored = [(r.summary.metrics[evidence], r.summary.run_name) for r in records
                  if evidence and isinstance(r.summary.metrics.get(evidence), int | float)]  # fmt: skip
        if scored:
            best, name = max(scored, key=lambda s: s[0])
            self.bar.set_postfix_str(f"best {evidence} {best:.2f} ({name})", refresh=False)
        self.bar.update(steps)

    def _do_work(self) -> None:
        """One shared pass, with the grad and autocast modes of the job thread that asked for it."""
        kind, op, requests, (grad, autocast), asking = self.work
        torch.set_num_threads(self.threads)
        try:
            with torch.set_grad_enabled(grad), contextlib.ExitStack() as modes:
                for device, dtype in autocast:
                    modes.enter_context(torch.autocast(device, dtype=dtype))
                outcome = op(requests)
        except Exception as err:  # noqa: BLE001 - every job of the pass gets it
            outcome = dict.fromkeys(requests, _Failed(err))
        self.results.update({(kind, index): result for index, result in outcome.items()})
        self.work = None
        asking.cv.notify()  # the job that handed in last waits for it

    def _job(self, member: Member) -> None:
        torch.set_num_threads(JOB_THREADS)
        with self.lock:
            member.cv.wait_for(lambda: self.turn == member.index or self.stopped is not None)
        try:
            if self.stopped is None:
                member.job_return = self.run_job_fn(member.config, member)
        except BaseException as err:  # noqa: BLE001 - run_job's own failure: this job's, reported as such
            member.job_return = JobReturn(status=JobStatus.FAILED, _return_value=err)
        finally:
            with self.lock:
                self.alive.remove(member.index)
                if self.turn == member.index:
                    self.turn = self._next(member.index)
                    if self.turn is not None:
                        self.members[self.turn].cv.notify()
                if not self.alive:
                    self.cv.notify()

    def _next(self, index: int) -> int | None:
        later = [i for i in self.alive if i > index] or [i for i in self.alive if i != index]
        return later[0] if later else (index if index in self.alive else None)

    def _switch(self, member: Member) -> None:
        """Give the turn to the next job and wait for it to come back (holding self.lock)."""
        following = self._next(member.index)
        if following == member.index:
            return
        member.save()
        self.turn = following
        self.members[following].cv.notify()
        member.cv.wait_for(lambda: self.turn == member.index or self.stopped is not None)
        if self.stopped is not None:
            raise PackStopped
        member.restore()

    def meet(
        self, kind: str, member: Member, request: Any, op: Callable[[dict[int, Any]], dict[int, Any]]
    ) -> Any:
        """Hand in this job's part of a shared step; when every job has, the pack's thread runs it for all."""
        with self.lock:
            self.requests[kind][member.index] = request
            while (kind, member.index) not in self.results:
                if set(self.requests[kind]) >= set(self.alive):
                    requests, self.requests[kind] = dict(sorted(self.requests[kind].items())), {}
                    self.work = (kind, op, requests, _modes(), member)
                    self.cv.notify()
                    member.cv.wait_for(lambda: self.work is None or self.stopped is not None)
                    if self.stopped is not None:
                        raise PackStopped
                else:
                    self._switch(member)
            result = self.results.pop((kind, member.index))
        if isinstance(result, _Failed):
            raise TrainingError(f"the pack's shared {kind} pass failed: {result.error}") from result.error
        return result

    # ------------------------------------------------------------------------------- the shared pass

    def lead_backbone(self, cfg_model) -> Backbone:
        if self.lead is None:
            self.lead = load_backbone(cfg_model)
        return self.lead

    def forward(self, requests: dict[int, dict[str, torch.Tensor]]) -> dict[int, torch.Tensor]:
        members = [self.members[i] for i in requests]
        lead = self.lead
        if not self.lead_cast:  # the jobs moved and cast the shared weights; the lead's own buffers follow
            first = members[0].module
            lead.to(device=first.device, dtype=first.backbone.unet.dtype)
            self.lead_cast = True
        for m in members:
            if not m.split:
                m.module.method.prepare_pack_lead(lead)
                self._split_at(m.paths())
                m.split = True
        losses = diffusion_losses(
            lead,
            list(requests.values()),
            route=lambda which, sizes: self._route([members[k] for k in which], sizes),
        )
        return dict(zip(requests, losses))

    def backward(self, requests: dict[int, torch.Tensor]) -> dict[int, None]:
        torch.autograd.backward(list(requests.values()))
        self._show_progress(len(requests))  # one optimizer step of each job that handed in a loss
        return dict.fromkeys(requests)

    def _split_at(self, paths: list[str]) -> None:
        """Splitters into the lead backbone at `paths` (outermost only), once each."""
        for path in sorted(paths, key=len):
            if path in self.split_paths or any(path.startswith(p + ".") for p in self.split_paths):
                continue
            parent, _, name = path.rpartition(".")
            holder = reach(self.lead, parent)
            split = _Split(self, path, getattr(holder, name))
            if isinstance(holder, nn.Module):
                holder.add_module(name, split)
            else:  # an attribute of a plain object (an attention processor's, say)
                setattr(holder, name, split)
            self.split_paths.add(path)

    @contextmanager
    def _route(self, members: list[Member], sizes: list[int]) -> Iterator[None]:
        """During one shared pass: which job owns which rows of the batch."""
        starts = np.cumsum([0, *sizes])
        self.passing = [(m, slice(int(a), int(b))) for m, a, b in zip(members, starts[:-1], starts[1:])]
        try:
            yield
        finally:
            self.passing, self._slices, self._runs, self.pass_memo = [], {}, {}, {}

    def runs(self, path: str, original: nn.Module) -> list[tuple[nn.Module, slice]]:
        """Who computes which rows at `path` in this pass: each job whose method acts there (at, inside or
        around it) its own module on its rows; neighbouring jobs whose method does not act there, the one
        shared module on all their rows at once."""
        runs = self._runs.get(path)
        if runs is None:
            runs = []
            for member, part in self.passing:
                if member.acts_at(path):
                    runs.append((member.module_at(path), part))
                elif runs and runs[-1][0] is original and runs[-1][1].stop == part.start:
                    runs[-1] = (original, slice(runs[-1][1].start, part.stop))
                else:
                    runs.append((original, part))
            self._runs[path] = runs
        return runs

    def rows(self, value: Any, total: int, parts: tuple[slice, ...]) -> list[Any]:
        """`value` in `parts`: rows of a batch-first tensor, else itself. A tensor read by many layers
        (the text context) is split once, so a method's per-tensor caches still hit."""
        if not (isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == total):
            return [value] * len(parts)
        key = (id(value), tuple((part.start, part.stop) for part in parts))
        cached = self._slices.get(key)
        if cached is None or cached[0] is not value:
            cached = (value, [value[part] for part in parts])
            self._slices[key] = cached
        return cached[1]


class _Split(nn.Module):
    """In the lead backbone, where methods act: each job's own module on its own rows (the original
    module, which it replaces there, on the rows of jobs whose method does not act there)."""

    def __init__(self, pack: Pack, path: str, original: nn.Module):
        super().__init__()
        object.__setattr__(self, "pack", pack)  # not a submodule: the pack is not part of the backbone
        self.path = path
        self.original = original

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        passing = self.pack.passing
        if not passing:
            raise RuntimeError(f"{self.path}: the pack's lead backbone is only for the shared pass")
        total = passing[-1][1].stop
        runs = self.pack.runs(self.path, self.original)
        if len(runs) == 1 and runs[0][0] is self.original:
            return self.original(*args, **kwargs)
        parts = tuple(part for _, part in runs)
        per_arg = [self.pack.rows(a, total, parts) for a in args]
        per_kwarg = {k: self.pack.rows(v, total, parts) for k, v in kwargs.items()}
        calls = [
            (tuple(a[j] for a in per_arg), {k: v[j] for k, v in per_kwarg.items()}) for j in range(len(runs))
        ]
        outputs: list[Any] = [None] * len(runs)
        # Jobs' own modules of one kind that can compute together (their type's `packed_group`, e.g. one
        # batched matrix product over the jobs' stacked weights) do; the others run one by one.
        own = [j for j, (module, _) in enumerate(runs) if module is not self.original]
        group = getattr(type(runs[own[0]][0]), "packed_group", None) if len(own) > 1 else None
        if group is not None and all(type(runs[j][0]) is type(runs[own[0]][0]) for j in own):
            found = group([runs[j][0] for j in own], [calls[j] for j in own], self.pack.pass_memo)
            for j, output in zip(own, found or []):
                outputs[j] = output
        outputs = [
            module(*calls[j][0], **calls[j][1]) if outputs[j] is None else outputs[j]
            for j, (module, _) in enumerate(runs)
        ]
        if all(isinstance(o, torch.Tensor) for o in outputs):
            return torch.cat(outputs)
        if all(isinstance(o, tuple) and all(isinstance(t, torch.Tensor) for t in o) for o in outputs):
            return tuple(torch.cat(parts) for parts in zip(*outputs))
        raise TypeError(
            f"{self.path}: where a method acts, a tensor or a tuple of tensors must come out to be packed"
        )


class PackedConceptModule(ConceptModule):
    """A packed job's LightningModule: its loss comes from the pack's shared pass and its backward runs
    once for the pack, when every job has handed in its loss. Everything else is ConceptModule's."""

    def __init__(self, member: Member, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.member = member
        member.module = self

    def step_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.member.loss(batch)

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        self.member.backward(loss)


class Member:
    """One job of a pack: its config, thread state, backbone copy and LightningModule. The job's task gets
    it (`pack=`) and asks it for the job's backbone, its module class and its log."""

    def __init__(self, pack: Pack, index: int, config: DictConfig):
        self.pack, self.index, self.config = pack, index, config
        self.cv = threading.Condition(pack.lock)  # this job's thread waits here for its turn
        self.job_return: JobReturn | None = None
        self.module: ConceptModule | None = None
        self.record: Any = None  # the job's run record (records.RunRecord), set by its task
        self._paths: list[str] | None = None
        self.split = False  # the lead backbone has splitters where this job's method acts
        self._modules: dict[str, nn.Module] = {}
        self._state: tuple | None = None

    # the job's view of the shared things
    def backbone(self, cfg_model, method: Method) -> Backbone:
        """This job's copy of the pack's backbone: its own modules (its method installs into them), the
        pack's weights; the pack's tokenizer unless the method changes the text encoding (it may add
        words), in which case a copy of its own (copy on write: most of a pack's jobs need none)."""
        lead = self.pack.lead_backbone(cfg_model)
        if not method.changes_text_encoding:
            return shared_copy(lead, share_tokenizer=True)
        if self.pack.tokenizer_blob is None:  # unpickling a copy takes half a deep copy's time
            self.pack.tokenizer_blob = pickle.dumps(lead.tokenizers)
        return shared_copy(lead, self.pack.tokenizer_blob)

    @property
    def data_memo(self) -> dict:
        """What the pack's jobs compute once from the same images (latents, cached text contexts)."""
        return self.pack.data_memo

    @contextmanager
    def job_log(self, run_dir: Path, job_name: str) -> Iterator[None]:
        """This job's log records into its own `<job name>.log`, as Hydra writes it for a job that runs
        alone (Hydra's job logging is the process's, not the thread's)."""
        handler = logging.FileHandler(run_dir / f"{job_name}.log")
        handler.setFormatter(logging.Formatter(JOB_LOG_FORMAT))
        thread = threading.get_ident()
        handler.addFilter(lambda record: record.thread == thread)
        logging.getLogger().addHandler(handler)
        try:
            yield
        finally:
            logging.getLogger().removeHandler(handler)
            handler.close()

    def paths(self) -> list[str]:
        if self._paths is None:
            self._paths = list(self.module.method.packed_modules(self.module.backbone) or [])
        return self._paths

    def acts_at(self, path: str) -> bool:
        """Whether this job's method acts at `path`, inside the module there, or around it."""
        return any(p == path or p.startswith(path + ".") or path.startswith(p + ".") for p in self.paths())

    def module_at(self, path: str) -> nn.Module:
        module = self._modules.get(path)
        if module is None:
            module = self._modules[path] = reach(self.module.backbone, path)
        return module

    # the job's part of a step
    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.pack.meet("forward", self, batch, self.pack.forward)

    def backward(self, loss: torch.Tensor) -> None:
        self.pack.meet("backward", self, loss, self.pack.backward)

    # the process-wide state that is the job's own: saved when it waits, restored when it runs again
    def save(self) -> None:
        cuda = (
            torch.cuda.get_rng_state_all()
            if torch.cuda.is_available() and torch.cuda.is_initialized()
            else None
        )
        self._state = (
            torch.get_rng_state(), cuda, np.random.get_state(), random.getstate(),
            HydraConfig.instance().cfg, os.environ.get("PL_GLOBAL_SEED"),
        )  # fmt: skip

    def restore(self) -> None:
        if self._state is None:
            return
        torch_rng, cuda, numpy_rng, python_rng, hydra_cfg, seed = self._state
        torch.set_num_threads(JOB_THREADS)
        torch.set_rng_state(torch_rng)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        np.random.set_state(numpy_rng)
        random.setstate(python_rng)
        HydraConfig.instance().cfg = hydra_cfg
        if seed is None:
            os.environ.pop("PL_GLOBAL_SEED", None)
        else:
            os.environ["PL_GLOBAL_SEED"] = seed


def reach(root: Any, path: str) -> Any:
    """What a dotted path names below `root`: submodules, and attributes of plain objects (processors)."""
    for part in path.split(".") if path else []:
        root = (
            root._modules[part]
            if isinstance(root, nn.Module) and part in root._modules
            else getattr(root, part)
        )
    return root


def shared_copy(
    backbone: Backbone, tokenizer_blob: bytes | None = None, share_tokenizer: bool = False
) -> Backbone:
    """The backbone again for one job: module objects of its own (its method installs into them: tokens,
    processors, adapters), every parameter and buffer the backbone's own tensor, its own model configs
    (a new word resizes a vocabulary) and its own tokenizer unless `share_tokenizer`. The VAE and the
    noise scheduler, which no method changes, are shared as they are."""
    memo: dict[int, nn.Module] = {id(backbone.vae): backbone.vae}
    clone = _module_copy(backbone, memo)
    if not share_tokenizer:
        # From this process's own pickle of the tokenizers (tokenizer_blob), when given: no outside data.
        tokenizers = pickle.loads(tokenizer_blob) if tokenizer_blob else copy.deepcopy(backbone.tokenizers)
        clone.tokenizer = tokenizers[0]
        if backbone.is_xl:
            clone.tokenizer_2 = tokenizers[1]
    return clone


def _module_copy(module: nn.Module, memo: dict[int, nn.Module]) -> nn.Module:
    if id(module) in memo:
        return memo[id(module)]
    clone = copy.copy(module)  # a new object whose attributes are the original's
    memo[id(module)] = clone
    for name in ("_parameters", "_buffers", "_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                 "_state_dict_hooks", "_load_state_dict_pre_hooks"):  # fmt: skip
        if name in module.__dict__:
            setattr(clone, name, copy.copy(module.__dict__[name]))
    if "config" in module.__dict__:
        clone.__dict__["config"] = copy.deepcopy(module.__dict__["config"])
    clone._modules = {
        name: None if child is None else _module_copy(child, memo) for name, child in module._modules.items()
    }
    return clone
