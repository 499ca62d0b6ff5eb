"""The run: ``train`` / ``resume`` and the training loop (nanoGPT-style, one step after another).

    for step in start+1 .. steps:
        lr ← linear warmup, cosine to min_lr_ratio · peak                       (docs/paper.md §Training)
        x, y ← mixture sampler batch ``step - 1`` (this rank's rows of the global batch)
        train_step: micro-batch forward/backward, clip, stop on NaN/Inf before the update, AdamW
        log (+ validate) every log_every / eval_every steps; checkpoint every ckpt_every steps
"""

from __future__ import annotations

import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
import yaml
from tqdm.auto import tqdm

from ..accounting import human_count
from ..config import RunConfig
from ..errors import CheckpointError, ConfigError
from ..fileio import write_text_atomic
from ..model import load_imbalance
from .budget import Budget, check_memory, lr_at, resolve_budget
from .callbacks import CallbackList, TrainContext
from .checkpoint import CheckpointStore, Selection, step_dir_name
from .data_prep import check_sources, prepare_data, train_sampler, unigram_entropy, validation_sets
from .distributed import (
    DistEnv, autocast_dtype, seed_everything, set_rng_state, setup_distributed, teardown_distributed,
)
from .dcp import ShardedFormat, format_for
from .formats import STATE_FORMAT, FullStateFormat
from .init import build_model
from .metrics import MetricsLog, RunRecord, now, read_metrics, report
from .optim import build_optimizer
from .tracking import check_tracking
from .presets import load_config
from .rundir import OutDir, check_out_dir, clear_failed_run, create_out_dir, resume_target
from .step import Diverged, TrainingDivergedError, check_finite_params, evaluate, train_step


@dataclass
class TrainResult:
    run_dir: Path
    status: str  # "completed" or "stopped"
    step: int
    total_steps: int
    val_loss: float | None  # last measured
    final_dir: Path | None  # RUN/final when completed

    @property
    def metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.run_dir / "metrics.jsonl")


def train(
    config: RunConfig | dict[str, Any] | str | Path,
    out_dir: str | Path,
    *,
    base_dir: str | Path | None = None,
    stop_after_steps: int | None = None,
    progress: bool | None = None,
    callbacks: Sequence[Any] | None = None,
) -> TrainResult:
    """Train from scratch into ``out_dir`` until the budget is spent or ``stop_after_steps``. ``config``: a
    RunConfig, a dict, or a YAML path; relative data paths resolve against ``base_dir`` (default: the YAML's
    directory, else the current directory). ``callbacks``: see :mod:`moelab.train.callbacks`.

    ``out_dir`` must not hold a run yet, except one that failed before its first checkpoint, which is replaced.
    Everything that can be checked cheaply (config, budget, memory estimate, data paths, ``out_dir``) is checked
    before the directory is created."""
    if isinstance(config, (str, Path)):
        base_dir = base_dir or Path(config).resolve().parent
        config = load_config(config)
    elif isinstance(config, dict):
        config = RunConfig.parse(config)
    base = Path(base_dir or Path.cwd()).resolve()
    budget = resolve_budget(config)
    check_memory(config.model, config.train)
    check_tracking(config.train)
    check_sources(config, base)
    out = check_out_dir(Path(out_dir).resolve())
    create_out_dir(out.path)
    return _run(config, budget, out, base, False, stop_after_steps, progress, callbacks)


def resume(
    run_dir: str | Path,
    *,
    stop_after_steps: int | None = None,
    progress: bool | None = None,
    callbacks: Sequence[Any] | None = None,
) -> TrainResult:
    """Continue a run from its newest checkpoint that verifies (from scratch if it died before the first),
    bit-identically. Newer checkpoints that fail verification are reported in one line and removed."""
    run_dir = Path(run_dir).resolve()
    info, cfg, base_dir = resume_target(run_dir)
    if info.get("status") == "completed":
        print(f"{run_dir}: already completed ({info.get('step')} steps); nothing to do", file=sys.stderr)
        budget_info = info.get("budget") if isinstance(info.get("budget"), dict) else {}
        total = budget_info.get("total_steps", info.get("step"))
        return TrainResult(run_dir, "completed", info.get("step"), total, info.get("val_loss"), run_dir / "final")
    budget = resolve_budget(cfg)
    check_memory(cfg.model, cfg.train)
    check_tracking(cfg.train)
    check_sources(cfg, base_dir)
    return _run(cfg, budget, OutDir(run_dir, None), base_dir, True, stop_after_steps, progress, callbacks)


def _run(cfg, budget, out: OutDir, base_dir, resuming, stop_after_steps, progress, callbacks) -> TrainResult:
    env = setup_distributed(cfg.train)
    try:
        progress = (sys.stderr.isatty() if progress is None else progress) and env.main
        return _Trainer(cfg, budget, env, out.path, base_dir, progress, CallbackList(callbacks)).run(
            out, resuming, stop_after_steps
        )
    finally:
        teardown_distributed(env)


class _StopRequest:
    """SIGTERM/SIGINT (e.g. a cluster's pre-emption notice, Ctrl-C) → finish the step, checkpoint, exit cleanly.
    A second SIGINT interrupts immediately."""

    def __init__(self) -> None:
        self.requested = False
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopRequest":
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: no handlers
            pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class _Trainer:
    """One run's state, from the checks at the start to the final export; methods in the order they run."""

    def __init__(self, cfg: RunConfig, budget: Budget, env: DistEnv, run_dir: Path, base_dir: Path, progress: bool,
                 callbacks: CallbackList):
        self.cfg, self.t, self.budget, self.env = cfg, cfg.train, budget, env
        self.run_dir, self.base_dir, self.progress, self.callbacks = run_dir, base_dir, progress, callbacks
        self.store = CheckpointStore(run_dir, keep_last=cfg.train.keep_last)
        self.amp = autocast_dtype(cfg.train, env.device)

    def run(self, out: OutDir, resuming: bool, stop_after_steps: int | None) -> TrainResult:
        t, env = self.t, self.env
        local_batch = t.global_batch // env.world_size
        if t.global_batch % env.world_size or local_batch % t.micro_batch:
            raise ConfigError(
                f"train.global_batch ({t.global_batch}) must split into {env.world_size} rank(s) × whole "
                f"micro-batches of train.micro_batch ({t.micro_batch})"
            )
        selection = self._select_checkpoint() if resuming else Selection(None)
        at = selection.step
        if stop_after_steps is not None and stop_after_steps < at:
            raise ConfigError(f"--stop-after-steps {stop_after_steps}: {self.run_dir} is already at step {at}")
        self._tidy(out, selection)
        self._start_record(resuming, selection)
        try:
            self._build(selection.path, resuming)
        except BaseException as e:
            self.record.update(status="failed", error=f"{type(e).__name__}: {e}")
            raise
        self._banner()
        return self._train(stop_after_steps)

    # --- before anything is written ---

    def _select_checkpoint(self) -> Selection:
        """Rank 0 verifies (hashes) the newest checkpoints and tells every rank which one to load, or the error."""
        pick: dict[str, Any] = {}
        if self.env.main:
            try:
                sel = self.store.select()
                pick = {"name": sel.path.name if sel.path else None, "rejected": sel.rejected}
            except CheckpointError as e:
                pick = {"error": str(e)}
        pick = self.env.broadcast_object(pick)
        if "error" in pick:
            raise CheckpointError(pick["error"])
        path = self.store.root / pick["name"] if pick["name"] else None
        return Selection(path, [tuple(r) for r in pick["rejected"]])

    def _tidy(self, out: OutDir, selection: Selection) -> None:
        """Rank 0: replace a failed start, remove leftovers of interrupted writes and checkpoints that failed
        verification. The others wait."""
        if self.env.main:
            if out.replaces is not None:
                print(f"moelab train: {self.run_dir}: replacing a run that failed before its first checkpoint "
                      f"({out.replaces})", file=sys.stderr)
                clear_failed_run(self.run_dir)
            self.store.clean_stale()
            message = selection.warning(self.run_dir)
            if message:
                print(message, file=sys.stderr, flush=True)
                self.store.discard([name for name, _ in selection.rejected])
        self.env.barrier()

    def _start_record(self, resuming: bool, selection: Selection) -> None:
        cfg, t, env = self.cfg, self.t, self.env
        self.record = record = RunRecord(self.run_dir, resuming, env)
        record.data.setdefault("started_at", now())
        if resuming:
            record.data.setdefault("resumes", []).append(
                {"from": selection.path.name if selection.path else None, "at": now()}
            )
        record.update(
            status="running",
            error=None,
            step=selection.step,
            config=cfg.model_dump(mode="json"),
            base_dir=str(self.base_dir),
            budget=self.budget.to_dict(),
            plan=self.budget.plan.to_dict(),
            world_size=env.world_size,
            parallel=t.parallel if env.world_size > 1 else "none",
            device=str(env.device),
            autocast=str(self.amp).removeprefix("torch.") if self.amp else "float32",
            torch=torch.__version__,
        )
        if env.main:
            text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
            write_text_atomic(self.run_dir / "config.yaml", text, fsync=True)

    def _build(self, ckpt: Path | None, resuming: bool) -> None:
        """Data, model, optimizer, sampler; restored from ``ckpt`` when resuming."""
        cfg, t, env, budget = self.cfg, self.t, self.env, self.budget
        ds, tok_dir = prepare_data(cfg, self.run_dir, self.base_dir, env, self.progress)
        seed_everything(t.seed)
        self.model, self.wrapped = build_model(cfg, t, env)  # meta → shard → materialise this rank's shards
        self.optimizer = build_optimizer(self.model, t, env.device)
        self.sampler = train_sampler(ds, cfg, env)
        sharded = t.ckpt_format == "sharded" or (t.ckpt_format == "auto" and env.world_size > 1)
        self.format = (ShardedFormat if sharded else FullStateFormat)(cfg.model, tok_dir)
        self.start_step = 0
        if ckpt is not None:  # read in the checkpoint's own format, whatever this run writes
            state, rng = format_for(ckpt, cfg.model, tok_dir).load(ckpt, self.wrapped, self.optimizer, env)
            self.start_step = int(state["step"])
            if (state["total_steps"], state["tokens_per_step"]) != (budget.total_steps, budget.tokens_per_step):
                raise CheckpointError(
                    f"{ckpt}: budget of {state['total_steps']} steps × {state['tokens_per_step']} tokens differs "
                    f"from the config's {budget.total_steps} × {budget.tokens_per_step}"
                )
            self.sampler.load_state_dict(state["sampler"])
            set_rng_state(rng)
        if self.sampler.step != self.start_step:
            raise CheckpointError(
                f"{ckpt}: the sampler is at batch {self.sampler.step}, the checkpoint at step {self.start_step}"
            )
        self.val_sets = validation_sets(ds, t, env)
        if "baselines" not in self.record.data:
            self.record.update(
                baselines={"unigram_entropy": unigram_entropy(ds), "uniform": math.log(ds.tokenizer.vocab_size)}
            )
        self.metrics = MetricsLog(self.run_dir, self.start_step if resuming else None, env.main, self.cfg)

    def _banner(self) -> None:
        cfg, budget, env = self.cfg, self.budget, self.env
        if env.main:
            print(
                f"moelab train: {cfg.model.name} ({cfg.model.num_params:,} params, {cfg.model.num_active_params:,} "
                f"active) | {budget.total_steps} steps × {budget.tokens_per_step:,} tokens = "
                f"{human_count(budget.train_tokens)} tokens (TPP {budget.to_dict()['tpp']:.1f}) | "
                f"{env.world_size} × {env.device.type}"
                + (f" | resuming at step {self.start_step}" if self.start_step else ""),
                file=sys.stderr,
            )

    # --- the loop ---

    def _train(self, stop_after_steps: int | None) -> TrainResult:
        budget, env = self.budget, self.env
        self.callbacks.ctx = TrainContext(
            self.cfg, budget, env, self.run_dir, self.model, self.wrapped, self.optimizer, self.start_step
        )
        stop_at = budget.total_steps if stop_after_steps is None else min(stop_after_steps, budget.total_steps)
        self.val_loss = self.record.data.get("val_loss")
        self.bar = tqdm(total=budget.total_steps, initial=self.start_step, unit="step", dynamic_ncols=True,
                        disable=not self.progress, file=sys.stderr)
        self.t_last, self.tokens_last = time.perf_counter(), self.start_step * budget.tokens_per_step
        try:
            self.callbacks.fire("on_train_start")
            with _StopRequest() as signals:
                step = self._steps(stop_at, signals)
            self.bar.close()
            status = "completed" if step == budget.total_steps else "stopped"
            if status == "completed":  # RUN/final: the last checkpoint without the training state
                self.store.export(self.store.root / step_dir_name(step), self.format, self.run_dir / "final", env,
                                  self._notify(step, prefix="final_"))
            self.record.update(status=status, step=step, val_loss=self.val_loss, finished_at=now())
        except Diverged as d:
            self.bar.close()
            good = self.store.latest()
            msg = (
                f"training diverged at step {d.step}: {d.what}; run marked failed, "
                f"last good checkpoint: {good if good else 'none (diverged before the first checkpoint)'}"
            )
            self.record.update(status="failed", error=msg, step=d.step - 1)
            raise TrainingDivergedError(msg) from None
        except BaseException as e:
            self.bar.close()
            self.record.update(status="failed", error=f"{type(e).__name__}: {e}")
            raise
        finally:
            self.metrics.close()
        final = self.run_dir / "final" if status == "completed" else None
        result = TrainResult(self.run_dir, status, step, budget.total_steps, self.val_loss, final)
        self.callbacks.fire("on_train_end", result)
        return result

    def _steps(self, stop_at: int, signals: _StopRequest) -> int:
        t, budget, env, cbs = self.t, self.budget, self.env, self.callbacks
        params = [p for p in self.model.parameters() if p.requires_grad]
        step = self.start_step
        while step < stop_at:
            step += 1
            lr = lr_at(step, t.lr, t.min_lr_ratio, budget.warmup_steps, budget.total_steps)
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            if cbs:
                cbs.fire("on_step_start", step)
            x_BT, y_BT = next(self.sampler)  # this rank's rows of global batch `step - 1`
            on_micro = (lambda i, _s=step: cbs.fire("on_micro_batch_end", _s, i)) if cbs else None
            s = train_step(self.wrapped, params, self.optimizer, x_BT, y_BT, self.cfg, env, self.amp,
                           signals.requested, step=step, on_micro_batch_end=on_micro)
            if cbs:
                cbs.fire("on_step_end", step, s)
            last = step == budget.total_steps
            do_eval = last or (t.eval_every > 0 and step % t.eval_every == 0)
            if do_eval or step % t.log_every == 0:
                self._log(step, lr, s, do_eval)
            self.bar.update(1)
            if s.stop_requested and step < stop_at:
                stop_at = step
                if env.main:
                    self.bar.write(f"moelab train: stop requested; checkpointing at step {step}")
            if last or step == stop_at or (t.ckpt_every > 0 and step % t.ckpt_every == 0):
                self._checkpoint(step)
        return step

    def _log(self, step: int, lr: float, s, do_eval: bool) -> None:
        budget, env = self.budget, self.env
        if env.world_size > 1:
            dist.all_reduce(s.counts_LE)
        tokens = step * budget.tokens_per_step
        tok_s = (tokens - self.tokens_last) / max(time.perf_counter() - self.t_last, 1e-9)
        imbalance = load_imbalance(s.counts_LE).tolist()
        rec = {
            "step": step,
            "tokens": tokens,
            "loss": s.loss,
            "lm_loss": s.lm_loss,
            "aux_loss": s.aux_loss,
            "z_loss": s.z_loss,
            "lr": lr,
            "grad_norm": s.grad_norm,
            "load_imbalance": imbalance,  # per layer: max / mean tokens per expert over the global batch
            "load_imbalance_max": max(imbalance),
            "tokens_per_s": tok_s,
            "tflops": tok_s * budget.plan.flops_per_token / 1e12 / env.world_size,  # per device
        }
        if do_eval:
            for key, batches in self.val_sets.items():
                rec[key] = evaluate(self.model, batches, self.t.micro_batch, env, self.amp)
            self.val_loss = rec["val_loss"]
        self.metrics.write(rec)
        report(self.bar, rec, budget, self.progress, env)
        self.record.update(step=step, val_loss=self.val_loss)  # so `cat RUN/run.json` shows progress
        self.callbacks.fire("on_log", rec)
        self.t_last, self.tokens_last = time.perf_counter(), tokens

    def _checkpoint(self, step: int) -> None:
        """Confirm the weights are finite, then write checkpoint ``step`` (every rank; collective)."""
        t, budget, env = self.t, self.budget, self.env
        check_finite_params(self.model, step, env)
        trainer_state = {
            "format": STATE_FORMAT,
            "step": step,
            "tokens": step * budget.tokens_per_step,
            "total_steps": budget.total_steps,
            "tokens_per_step": budget.tokens_per_step,
            "schedule": {"kind": "linear_warmup_cosine", "peak_lr": t.lr, "min_lr_ratio": t.min_lr_ratio,
                         "warmup_steps": budget.warmup_steps},
            "sampler": self.sampler.state_dict(),
            "world_size": env.world_size,
        }
        path = self.store.save(step, self.format, self.wrapped, self.optimizer, trainer_state, env, self._notify(step))
        self.record.update(step=step, last_checkpoint=str(path.relative_to(self.run_dir)))
        self.callbacks.fire("on_checkpoint", step, path)

    def _notify(self, step: int, prefix: str = ""):
        if not self.callbacks:
            return None
        return lambda stage, path: self.callbacks.fire("on_checkpoint_stage", step, prefix + stage, path)
