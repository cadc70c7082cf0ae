"""The training loop: the strong baseline and every method built on it, on 1..N processes.

``train(config)`` joins the process group, then ``_train`` reads as a page of named steps:
build (data set, sampler, loader, model, losses, optimizer and schedule, wrapped in the strategy),
restore or start, evaluate before training, the epoch loop (train an epoch, end it: periodic
evaluation and checkpoint), the final evaluation. A method changes none of these steps: its head,
loss terms and test-time distance plug in where the model, the criterion and the evaluation are
built. A SLURM pre-emption signal (USR1 or TERM) makes every rank stop at the same step boundary
after one last checkpoint (engine/resume.py: the signal, generators, restoring). A saved model is
loaded and evaluated by engine/saved.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hpc_reid.atomic import write_atomic
from hpc_reid.config import Config, save_resolved
from hpc_reid.data.build import dataset_on_ranks
from hpc_reid.data.fields import batch_fields, with_fields
from hpc_reid.data.loaders import build_backend_train_loader, frames_channels_last
from hpc_reid.data.samplers import PlannedBatchSampler, build_sampler
from hpc_reid.engine.checkpoint import CheckpointManager
from hpc_reid.engine.class_means import class_means
from hpc_reid.engine.errors import TrainingError
from hpc_reid.engine.evaluate import check_evaluation_distance, evaluate_model, metrics_line
from hpc_reid.engine.optim import (
    build_optimizer,
    build_scheduler,
    scaled_lr,
    strategy_args,
)
from hpc_reid.engine.resume import StopSignal, all_rng_states, checkpoint_to_resume, restore
from hpc_reid.engine.run_log import RunLog
from hpc_reid.engine.strategy import DDPStrategy, prepare_model, sync_bn_applies
from hpc_reid.evaluation.ranking import BACKENDS as RANKING_BACKENDS
from hpc_reid.launch.distributed import (
    choose_backend,
    cleanup,
    cuda_device_index,
    detect_env,
    init_distributed,
)
from hpc_reid.losses import ReidLoss
from hpc_reid.models import build_model


def select_device(requested: str, local_rank: int) -> torch.device:
    """The device ``engine.device=requested`` means for local rank ``local_rank``, made current.

    On CUDA the index comes from the visible device count (:func:`cuda_device_index`): under
    SLURM's per-task GPU binding each task sees its own GPU as ``cuda:0``.
    """
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise TrainingError("engine.device=cuda but no CUDA device is visible")
        index = cuda_device_index(local_rank, torch.cuda.device_count())
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def check_evaluation_backend(backend: str, device: torch.device) -> None:
    """Refuse, before any training, an evaluation backend that the first evaluation would refuse:
    one not available here, or ``cuda`` on a CUDA device whose fused ranking kernel cannot be built
    (compiled now, once, rather than after hours of training)."""
    if backend not in ("auto", *RANKING_BACKENDS):
        raise TrainingError(
            f"evaluation.backend={backend!r} is not available here; "
            f"available: auto, {', '.join(RANKING_BACKENDS)}"
        )
    if backend == "cuda" and device.type == "cuda":
        from hpc_reid.evaluation import ranking_cuda  # compiles the kernel on first use only

        try:
            ranking_cuda.kernel_for("cuda")
        except RuntimeError as exc:
            raise TrainingError(f"evaluation.backend=cuda, but {exc}") from exc


def run_dir_of(config: Config) -> Path:
    return Path(config.logging.output_dir) / (config.logging.run_name or config.name)


def model_meta(config: Config, num_classes: int, model) -> dict[str, Any]:
    """What a checkpoint must match to be loaded into this run's model: the config's shape keys
    and what the head declares of its own shape (``head.meta``: AlignedReID's stripes)."""
    m = config.model
    return {
        "backbone": m.backbone,
        "last_stride": m.last_stride,
        "pooling": m.pooling,
        "neck": m.neck,
        **({"non_local": True} if m.non_local else {}),  # absent when off: older checkpoints fit
        "num_classes": num_classes,
        "feature_dim": model.feature_dim,
        **getattr(model.head, "meta", {}),
    }


Reporter = Callable[[dict[str, Any], "Path | None"], None]


def train(
    config: Config,
    resume: str | None = None,
    max_steps: int | None = None,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """Train (and evaluate) as ``config`` says; returns the final metrics summary.

    ``resume``: ``"auto"`` (the run folder's newest checkpoint, if any) or a checkpoint path.
    ``max_steps``: stop after this global step with a checkpoint (for tests and smoke runs).
    ``reporter(metrics, checkpoint)``: called on every rank after each periodic evaluation and
    after the final one (Ray Train / Tune report from it). ``metrics`` holds the evaluation
    summary plus ``step``, ``epoch`` and ``final``; ``checkpoint`` is the checkpoint file written
    at that step on rank 0 (None on the other ranks, or when none was written).
    """
    env = detect_env()
    device = select_device(config.engine.device, env.local_rank)
    init_distributed(
        env, choose_backend(config.distributed.backend, device), config.distributed.timeout_s
    )
    try:
        return _train(config, env.rank, env.world_size, device, resume, max_steps, reporter)
    finally:
        cleanup()


def _train(config, rank, world, device, resume, max_steps, reporter):
    """The run as a page of named steps; each is a method of :class:`_Run` below."""
    run = _Run.build(config, rank, world, device, resume)
    try:
        run.restore_or_start()
        run.evaluate_before_training()
        while run.epoch < run.epochs:
            stopped = run.train_epoch(max_steps)
            if stopped is not None:  # pre-emption signal or max_steps: checkpointed, leave
                return stopped
            run.end_epoch(reporter)  # periodic evaluation and checkpoint
        return run.final_evaluation(reporter)
    finally:
        run.close()


@dataclass(eq=False)
class _Run:
    """One training run's parts and position. :meth:`build` makes the parts (data, sampler,
    loader, model, losses, optimizer, schedule, strategy); the other methods are the loop's steps.

    Where a method plugs in: its head builds inside :func:`build_model` (``model.head``), its loss
    terms inside :class:`ReidLoss` (``loss.*``, with the batch fields they declare), its test-time
    distance inside :func:`evaluate_model` (``evaluation.distance``); nothing here knows which
    method runs.
    """

    config: Config
    rank: int
    world: int
    main: bool
    device: torch.device
    run_dir: Path
    checkpoints: CheckpointManager
    resume_path: Path | None
    log: RunLog
    dataset: Any  # hpc_reid.data.build's ReidDataset: train/query/gallery records
    sampler: PlannedBatchSampler  # identity or random batches (sampler.kind)
    loader: Any  # the torch or DALI training loader: batches of dict(images, pids, ...)
    model: torch.nn.Module  # as prepared (SyncBatchNorm, channels_last), before the strategy
    criterion: ReidLoss
    accum: int  # micro-batches per optimizer step
    optimizer: torch.optim.Optimizer
    strategy: Any  # DDPStrategy or DeepSpeedStrategy
    forward: Callable  # the strategy's model, torch.compile'd with engine.compile
    meta: dict[str, Any]  # what a checkpoint must match (model_meta)
    notes: str  # the start-up line of the run log
    # the position: epochs done, optimizer steps, best mAP, batches of this epoch consumed
    epoch: int = 0
    step: int = 0
    best: float | None = None
    consumed: int = 0
    last_saved_step: int = -1
    stop: StopSignal = field(default_factory=lambda: StopSignal())

    @property
    def epochs(self) -> int:
        return self.config.schedule.epochs

    # ------------------------------------------------------------------------------- build

    @classmethod
    def build(cls, config: Config, rank: int, world: int, device, resume) -> _Run:
        main = rank == 0
        sync_bn_applies(config.distributed.sync_bn, device, world)  # refuses an impossible setting
        check_evaluation_backend(config.evaluation.backend, device)
        run_dir = run_dir_of(config)
        lg = config.logging
        checkpoints = CheckpointManager(run_dir, lg.keep_last, lg.keep_best)
        resume_path = checkpoint_to_resume(resume, checkpoints)
        log = RunLog(
            run_dir, enabled=main, tensorboard=lg.tensorboard, progress_bar=lg.progress_bar
        )

        dataset = dataset_on_ranks(config.data, main, announce=log.info)
        log.info(dataset.statistics())

        s = config.sampler
        sampler = build_sampler(dataset.train, s, config.engine.seed, rank, world)
        loader = build_backend_train_loader(
            dataset.train,
            sampler,
            config.loader,
            config.data.height,
            config.data.width,
            config.engine.seed,
            device,
            channels_last=config.engine.channels_last,
            video=config.data.video,
        )

        # Model, losses, optimizers: the same initial weights on every rank.
        torch.manual_seed(config.engine.seed)
        num_classes = dataset.num_train_pids
        model = build_model(config.model, num_classes).to(device)
        meta = model_meta(config, num_classes, model)  # what a checkpoint must match
        if config.model.init_from is not None:  # a stage: another run's weights, unless resuming
            from hpc_reid.engine.stages import init_stage  # stages.py imports this module

            log.info(init_stage(model, config.model.init_from, meta, run_dir, resume_path))
        check_evaluation_distance(model, config)  # evaluation.distance's parts: now, not at the end
        model, sync_bn_note = prepare_model(model, config, device, world)  # before the optimizer
        criterion = ReidLoss(
            config.loss, num_classes, model.feature_dim, model.output_keys, config.model.head
        ).to(device)
        # the batch fields the terms read, on no sample: a field's setup error (a training image
        # without its SAN texture) now, before any training
        no_sample = torch.zeros(0, dtype=torch.long)
        batch_fields(criterion.batch_fields, dataset.train, no_sample, device, config)
        accum = 1  # micro-batches per optimizer step (DeepSpeed's gradient_accumulation_steps)
        if config.engine.strategy == "deepspeed":  # imported here: deepspeed is an optional extra
            from hpc_reid.engine.deepspeed_strategy import accumulation_steps

            accum = accumulation_steps(config)
        # The LR rule sees the images per optimizer step; the schedule counts iterations (batches).
        global_batch = sampler.batch_size * world * accum
        lr, lr_note = scaled_lr(config.optimizer, global_batch)
        optimizer = build_optimizer(model, config.optimizer, lr)
        scheduler = build_scheduler(optimizer, config.schedule, sampler.batches_per_epoch)
        strategy_cls, strategy_kwargs = DDPStrategy, {}
        if config.engine.strategy == "deepspeed":  # imported here: deepspeed is an optional extra
            from hpc_reid.engine.deepspeed_strategy import DeepSpeedStrategy

            strategy_cls = DeepSpeedStrategy
            strategy_kwargs = {"config": config, "checkpoint_dir": checkpoints.folder}
            strategy_kwargs["keep_last"] = config.logging.keep_last
            strategy_kwargs["model_factory"] = lambda: build_model(config.model, num_classes).to(
                device
            )
        strategy = strategy_cls(
            model,
            optimizer,
            scheduler,
            device=device,
            **strategy_args(config, criterion),
            **strategy_kwargs,
        )
        forward = torch.compile(strategy.model) if config.engine.compile else strategy.model
        notes = (
            f"run folder {run_dir.resolve()}; {world} process(es) on {device}; "
            f"global batch {global_batch} = {sampler.describe()} x {world} ranks"
            + (f" x {accum} accumulated micro-batches per optimizer step" if accum > 1 else "")
            + f"; {lr_note}; {sampler.batches_per_epoch} iterations per epoch; {sync_bn_note}"
        )
        return cls(
            config=config,
            rank=rank,
            world=world,
            main=main,
            device=device,
            run_dir=run_dir,
            checkpoints=checkpoints,
            resume_path=resume_path,
            log=log,
            dataset=dataset,
            sampler=sampler,
            loader=loader,
            model=model,
            criterion=criterion,
            accum=accum,
            optimizer=optimizer,
            strategy=strategy,
            forward=forward,
            meta=meta,
            notes=notes,
        )

    def eval_model(self):
        """The model to evaluate (ZeRO-3 gathers its partitioned weights first)."""
        return getattr(self.strategy, "evaluation_model", lambda: self.strategy.module)()

    # ------------------------------------------------------------------ restore / start

    def restore_or_start(self) -> None:
        if self.resume_path is not None:
            self.epoch, self.step, self.best = restore(
                self.resume_path,
                self.meta,
                self.strategy,
                self.criterion,
                self.sampler,
                self.rank,
                self.world,
                self.device,
                self.log,
            )
        else:
            self.sampler.set_epoch(0)
        if self.main:
            save_resolved(self.config, self.run_dir)
        # st-ReID's camera-pair histogram of the training set's frame differences, beside the
        # checkpoints for hpc-reid eval (a set with frame numbers; a set without them is refused
        # here with evaluation.st.enabled). Collective: rank 0 writes, every rank waits for it.
        from hpc_reid.evaluation.st import save_run_histogram

        save_run_histogram(self.dataset, self.config, self.run_dir, self.main)
        self.log.info(self.notes)

    def evaluate_before_training(self) -> None:
        if self.resume_path is None and self.config.evaluation.at_start:
            start = evaluate_model(self.eval_model(), self.dataset, self.config, self.device)
            self.log.info("before training (initial weights): " + metrics_line(start))
            self.log.scalars(0, start, kind="eval")
            if self.main:
                text = json.dumps(start, indent=2) + "\n"
                write_atomic(self.run_dir / "results_start.json", text)

    # ------------------------------------------------------------------------- the epoch

    def train_epoch(self, max_steps: int | None) -> dict[str, Any] | None:
        """One epoch (the rest of it, after a mid-epoch resume). Returns ``{"stopped_at_step",
        "preempted"}`` after a last checkpoint when the ranks agreed to stop (a pre-emption
        signal) or ``max_steps`` was reached; None at the epoch's end."""
        config, sampler, log, device = self.config, self.sampler, self.log, self.device
        self.consumed = sampler.batches_per_epoch - len(sampler)
        self.model.train()
        log.start_epoch(self.epoch, self.epochs, sampler.batches_per_epoch, self.consumed)
        tic, seen, postfix = time.perf_counter(), 0, {}
        check_every = config.distributed.stop_check_every
        for batch in self.loader:
            self.refresh_terms(epoch_start=self.consumed == 0)  # the anchor loss's anchors
            images = batch["images"].to(device, non_blocking=True)
            if config.engine.channels_last:  # 5-D tracklet batches: each frame channels_last
                images = frames_channels_last(images)
            pids = batch["pids"].to(device, non_blocking=True)
            # the per-sample targets the loss terms declare (hpc_reid.data.fields), if any
            fields = self.criterion.batch_fields
            batch = with_fields(batch, fields, self.dataset.train, device, config)
            with self.strategy.autocast():
                outputs = self.forward(images)
            outputs = {k: v.float() for k, v in outputs.items()}
            total, parts = self.criterion(outputs, pids, batch)
            self.strategy.step(total)
            self.step, self.consumed, seen = self.step + 1, self.consumed + 1, seen + len(images)
            # Reading a loss waits for the GPU: only on logging steps, so the host can queue
            # the next steps' kernels meanwhile (the progress bar shows the last logged loss).
            if self.step % config.logging.log_every == 0:
                values = {k: v.item() for k, v in parts.items()}
                values.update(loss=total.item(), lr=self.optimizer.param_groups[0]["lr"])
                rate = seen * self.world / (time.perf_counter() - tic)  # timed after that wait
                log.scalars(self.step, {**values, "img_per_s": rate, "epoch": self.epoch})
                postfix = {"loss": f"{values['loss']:.3f}", "img/s": f"{rate:.0f}"}
            log.advance(postfix)
            # The ranks agree on a pre-emption every check_every steps and at an epoch's end
            # (the same steps on every rank), at an accumulation boundary where resuming is
            # exact; the agreement is a collective and a host sync, hence not every step.
            at_boundary = self.step % self.accum == 0
            at_max = max_steps is not None and self.step >= max_steps
            at_check = self.step % check_every == 0 or self.consumed == sampler.batches_per_epoch
            at_check = at_check or at_max
            if (at_boundary and at_check and self.stop.agreed(device)) or at_max:
                log.end_epoch()
                self.save("stop" if self.stop.stopping else "max steps")
                return {"stopped_at_step": self.step, "preempted": self.stop.stopping}
        log.end_epoch()
        return None

    def refresh_terms(self, epoch_start: bool) -> None:
        """Recompute the loss terms' state that comes from the model over the training set, where
        due (:meth:`ReidLoss.refresh`: the anchor loss's class anchors, at the start of every
        epoch): on every rank at the same step, each rank extracting its shard of the training set
        (:func:`~hpc_reid.engine.class_means.class_means`). Before the step, after the previous
        step's checkpoint, so a resumed run refreshes where an uninterrupted one did."""

        def means(requests):
            model, train = self.eval_model(), self.dataset.train
            num_classes = self.dataset.num_train_pids
            return class_means(model, train, self.config, self.device, requests, num_classes)

        tic = time.perf_counter()
        done = self.criterion.refresh(self.epoch, self.step, epoch_start, means)
        if done:
            self.log.info(
                f"epoch {self.epoch + 1}, step {self.step}: "
                + ", ".join(f"loss.{n}" for n in done)
                + f" refreshed over the {len(self.dataset.train)} training images in "
                f"{time.perf_counter() - tic:.1f} s"
            )

    def end_epoch(self, reporter: Reporter | None) -> None:
        """Into the next epoch; a periodic evaluation (which checkpoints, and marks the best) or
        a periodic checkpoint when one is due."""
        self.epoch += 1
        self.sampler.set_epoch(self.epoch)
        self.consumed = 0
        ev, ck = self.config.evaluation.every_epochs, self.config.logging.checkpoint_every
        if ev and self.epoch % ev == 0 and self.epoch < self.epochs:
            summary = evaluate_model(self.eval_model(), self.dataset, self.config, self.device)
            self.log.info(f"epoch {self.epoch}: " + metrics_line(summary))
            self.log.scalars(self.step, summary, kind="eval")
            improved = self.best is None or summary["mAP"] > self.best
            self.best = summary["mAP"] if improved else self.best
            path = self.save("periodic")
            if improved and path is not None and self.config.logging.keep_best:
                self.checkpoints.mark_best(path)
            if reporter is not None:
                metrics = {**summary, "step": self.step, "epoch": self.epoch, "final": False}
                reporter(metrics, path)
        elif (ck and self.epoch % ck == 0) or self.epoch == self.epochs:
            self.save("periodic")

    # ------------------------------------------------------------------- evaluate / save

    def final_evaluation(self, reporter: Reporter | None) -> dict[str, Any]:
        run_dir, log = self.run_dir, self.log
        summary = evaluate_model(
            self.eval_model(), self.dataset, self.config, self.device, out_dir=run_dir
        )
        log.scalars(self.step, summary, kind="eval")
        split = "validation" if self.config.data.validation.fraction > 0 else "test"
        log.info(f"final evaluation on the {split} split: " + metrics_line(summary))
        saved_now = self.main and self.last_saved_step == self.step
        latest = self.checkpoints.latest() if saved_now else None
        better = self.best is None or summary["mAP"] >= self.best
        if latest is not None and better and self.config.logging.keep_best:
            self.checkpoints.mark_best(latest)
        if reporter is not None:
            reporter({**summary, "step": self.step, "epoch": self.epoch, "final": True}, latest)
        log.info(
            f"results: {run_dir / 'results.json'}; plots: {run_dir / 'cmc.png'}, "
            f"{run_dir / 'ranked.png'}; checkpoints: {self.checkpoints.folder}; "
            f"TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}"
        )
        return summary

    def save(self, tag: str) -> Path | None:
        """A checkpoint of everything resuming needs (on rank 0; the others return None)."""
        state = {
            "strategy": self.strategy.state_dict(),
            "criterion": self.criterion.state_dict(),
            "sampler": self.sampler.state_dict(batches_consumed=self.consumed),
            "rng": all_rng_states(self.device),
            "epoch": self.epoch,
            "step": self.step,
            "best": self.best,
            "world_size": self.world,
            "model_meta": self.meta,
            "config": self.config.to_dict(),
        }
        self.last_saved_step = self.step
        if not self.main:
            return None
        path = self.checkpoints.save(state, epoch=self.epoch, step=self.step)
        self.log.info(f"checkpoint ({tag}): {path}")
        return path

    def close(self) -> None:
        self.stop.restore()
        self.log.close()
