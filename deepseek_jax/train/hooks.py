"""What the training loop does around each step, one hook per concern: the metrics record (``metrics.jsonl``
and TensorBoard), the progress bar, the host EMA, periodic validation and checkpoints, and the signal stop.

A hook has ``after_step(step, state, rec)`` (``rec``: the step's metrics record) and ``close()``; the loop
(:mod:`deepseek_jax.train.loop`) calls them in order after every step.
"""

from __future__ import annotations

import signal
import sys
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from deepseek_jax.nn import tree
from deepseek_jax.train.optim import HostEMA
from deepseek_jax.train.run_dir import Checkpoints, RunDir
from deepseek_jax.train.step import TrainFns, global_batch

__all__ = ["Hook", "log", "to_host", "step_record", "MetricsHook", "ProgressHook", "EMAHook", "CallbackHook",
           "ValidationHook", "CheckpointHook", "StopOnSignal", "eval_rows"]


def log(msg: str) -> None:
    """A message on stderr, from process 0 only."""
    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)


def to_host(tree_: Any) -> Any:
    """A (possibly multi-process) device tree as host arrays."""
    if jax.process_count() > 1:
        return multihost_utils.process_allgather(tree_, tiled=True)
    return jax.device_get(tree_)


class Hook:
    def after_step(self, step: int, state: Any, rec: dict) -> None:
        pass

    def close(self) -> None:
        pass


def step_record(step: int, m: dict, seconds: float, tokens: int, flops_per_token: float, peak: float,
                hyper: dict) -> dict:
    """The JSON record of one step from its (host) metrics ``m``."""
    tps = tokens / seconds
    rec = {"step": step, "kind": "train", "loss": float(m["loss"])}
    if "ce" in m:
        rec["ce"] = float(m["ce"])
    rec.update(lr=float(m["lr"]), grad_norm=float(m["grad_norm"]), tokens_per_s=tps,
               mfu=flops_per_token * tps / peak, **{k: float(v) for k, v in hyper.items()})
    if "mtp" in m:
        rec["mtp"] = [float(x) for x in np.atleast_1d(m["mtp"])]
    for k in ("balance", "z", "dropped_rows", "kd", "indexer_kl"):
        if k in m:
            rec[k] = float(m[k])
    if "maxvio" in m:
        rec["maxvio_layers"] = [float(x) for x in m["maxvio"]]
        rec["maxvio"] = float(np.mean(m["maxvio"]))
        rec["expert_load"] = np.asarray(m["expert_load"]).astype(int).tolist()
    return rec


class MetricsHook(Hook):
    """Every ``log_every`` steps (and the last) a record to ``metrics.jsonl`` and TensorBoard (process 0)."""

    def __init__(self, run: RunDir, log_every: int, last_step: int):
        self.run, self.every, self.last = run, log_every, last_step
        self.writer = None
        if jax.process_index() == 0:
            from tensorboardX import SummaryWriter  # optional heavy dependency, imported where used

            self.writer = SummaryWriter(str(run.tensorboard))

    def record(self, rec: dict) -> None:
        if self.writer is None:
            return
        self.run.append_metrics(rec)
        for k, v in rec.items():
            if isinstance(v, (int, float)) and k != "step":
                self.writer.add_scalar(f"{rec.get('kind', 'train')}/{k}", v, rec["step"])

    def after_step(self, step, state, rec):
        if step % self.every == 0 or step == self.last:
            self.record(rec)

    def close(self):
        if self.writer is not None:
            self.writer.close()


class ProgressHook(Hook):
    """A tqdm bar with loss, learning rate, tokens/s, MFU and MaxVio (process 0, when asked for)."""

    def __init__(self, enabled: bool, total: int, initial: int):
        self.bar = None
        if enabled and jax.process_index() == 0:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg)

    def after_step(self, step, state, rec):
        if self.bar is None:
            return
        post = {"loss": f"{rec['loss']:.3f}", "lr": f"{rec['lr']:.2e}", "tok/s": f"{rec['tokens_per_s']:,.0f}",
                "MFU": f"{rec['mfu']:.1%}"}
        if "maxvio" in rec:
            post["MaxVio"] = f"{rec['maxvio']:.2f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class EMAHook(Hook):
    """The host EMA of the parameters, updated after every step (``optim.ema_decay > 0``)."""

    def __init__(self, ema: HostEMA):
        self.ema = ema

    def after_step(self, step, state, rec):
        params = state[tree.PARAMS]
        self.ema.update(to_host(params) if jax.process_count() > 1 else params)


class CallbackHook(Hook):
    def __init__(self, fn: Callable[[int, dict], None]):
        self.fn = fn

    def after_step(self, step, state, rec):
        self.fn(step, rec)


def eval_rows(val: dict[str, np.ndarray], batch: int, n_batches: int) -> list[dict[str, np.ndarray]]:
    """The first ``n_batches`` global batches of validation rows (the last padded with masked rows)."""
    n = min(len(val["tokens"]), batch * n_batches)
    out = []
    for i in range(0, n, batch):
        rows = {k: v[i:i + batch] for k, v in val.items()}
        short = batch - len(rows["tokens"])
        if short:
            rows = {k: np.concatenate([v, np.zeros((short,) + v.shape[1:], v.dtype)]) for k, v in rows.items()}
        out.append(rows)
    return out


class ValidationHook(Hook):
    """Every ``every`` steps (and the last) the mean next-token loss over the validation rows."""

    def __init__(self, fns: TrainFns, rows: list[dict], local_rows: list[int], batch_size: int, every: int,
                 last_step: int, metrics: MetricsHook, progress: ProgressHook):
        self.fns, self.rows, self.local, self.batch = fns, rows, local_rows, batch_size
        self.every, self.last, self.metrics, self.progress = every, last_step, metrics, progress
        self.val_loss: float | None = None

    def validate(self, state: Any) -> float | None:
        if not self.rows:
            return None
        tot, cnt = 0.0, 0.0
        for rows in self.rows:
            b = global_batch({k: v[self.local] for k, v in rows.items()}, self.fns.batch_sharding, self.batch)
            s, n = self.fns.eval(state[tree.PARAMS], state[tree.ROUTER], b)
            tot, cnt = tot + float(s), cnt + float(n)
        return tot / max(cnt, 1.0)

    def after_step(self, step, state, rec):
        if self.rows and (step % self.every == 0 or step == self.last):
            self.val_loss = self.validate(state)
            self.metrics.record({"step": step, "kind": "val", "loss": self.val_loss})
            self.progress.write(f"step {step}: validation loss {self.val_loss:.4f}")


class CheckpointHook(Hook):
    """Every ``every`` steps (and the last) an async checkpoint of the state, the data position and the EMA."""

    def __init__(self, ckpts: Checkpoints, batches, ema: HostEMA | None, every: int, last_step: int,
                 last_good: int | None):
        self.ckpts, self.batches, self.ema = ckpts, batches, ema
        self.every, self.last = every, last_step
        self.last_good = last_good  # the newest step whose checkpoint was started

    def save(self, step: int, state: Any, wait: bool = False) -> None:
        self.ckpts.save(step, state, {"data": self.batches.state(), "step": step},
                        self.ema.value() if self.ema is not None else None, wait=wait)
        self.last_good = step

    def after_step(self, step, state, rec):
        if step % self.every == 0 or step == self.last:
            self.save(step, state)

    def close(self):
        self.ckpts.close()


class StopOnSignal:
    """SIGINT/SIGTERM set ``.signal`` instead of killing the process (the loop then saves and exits)."""

    def __init__(self):
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: no handlers
                pass
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
