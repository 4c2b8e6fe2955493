"""The run folder, its ONE owner: ``config.yaml``, ``tokenizer.json``, ``metrics.jsonl`` and the Orbax
checkpoints under ``checkpoints/`` are written and read here (by ``train`` and by ``generate``).

Layout::

    out/.lock                held (flock) by the one process writing the folder; names it for the next one
    out/config.yaml          the model config and the train: section
    out/tokenizer.json       the byte-level BPE the run trained (or was given)
    out/metrics.jsonl        one JSON record per logged step ({"step", "kind": "train"|"val", ...}), append-only
    out/tensorboard/         the same scalars for TensorBoard
    out/checkpoints/<step>/  state (params, router, opt_state, step), meta (data position, fingerprint), ema
    out/checkpoints_unreadable/<step>-<time>/   checkpoints that failed to restore or verify, kept for inspection

Every checkpoint's ``meta`` carries a fingerprint of its arrays (:mod:`deepseek_jax.train.integrity`);
a restore that does not match it, or that holds an inf/NaN, is treated like an unreadable checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import yaml
from jax.experimental import multihost_utils

from deepseek_jax.config import ModelConfig, config_from_dict
from deepseek_jax.config_io import plain, read_yaml, strip_train_section
from deepseek_jax.hf import load_checkpoint
from deepseek_jax.nn import tree
from deepseek_jax.nn.placement import init_unboxed
from deepseek_jax.train.config import TrainConfig
from deepseek_jax.train.data import load_tokenizer
from deepseek_jax.train.integrity import fingerprint, nonfinite_leaves
from deepseek_jax.train.lock import RunLock, RunLocked
from deepseek_jax.train.metrics_log import append_metric, truncate_metrics

__all__ = ["RunDir", "Checkpoints", "load_run", "CheckpointCorrupt", "CheckpointWriteError", "RunLocked"]

_Log = Callable[[str], None]


class CheckpointCorrupt(ValueError):
    """A checkpoint restored, but its arrays do not match its fingerprint or hold an inf/NaN."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. the disk is full); the message is one line naming the path."""


class RunDir:
    """A run folder ``out``: checks it can be written and holds this model, writes the set-up files."""

    def __init__(self, out: str | Path):
        self.path = Path(out).resolve()
        self.config = self.path / "config.yaml"
        self.tokenizer = self.path / "tokenizer.json"
        self.metrics = self.path / "metrics.jsonl"
        self.tensorboard = self.path / "tensorboard"
        self.checkpoints = self.path / "checkpoints"

    @contextlib.contextmanager
    def open_for_writing(self, cfg: ModelConfig, lock: bool = True) -> Iterator["RunDir"]:
        """Check the folder is writable, hold its lock (``lock``: process 0 of a run) for the ``with`` block,
        and check it holds no run of another model. :class:`RunLocked` names the other writer."""
        self._check_writable()
        with RunLock(self.path) if lock else contextlib.nullcontext():
            self.check(cfg)
            yield self

    def _check_writable(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write-test-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise ValueError(f"train.out={str(self.path)!r} is not a writable folder ({e.strerror}); "
                             "choose another") from None

    def check(self, cfg: ModelConfig) -> None:
        """``ValueError`` if the folder is not writable or holds a run of another model."""
        self._check_writable()
        if self.config.exists():
            old, _ = strip_train_section(read_yaml(self.config))
            if old != yaml.safe_load(yaml.safe_dump(cfg.to_dict())):
                raise ValueError(f"train.out={str(self.path)!r} holds a run of a different model (see {self.config}); "
                                 "resume it with the same model config, or choose another train.out")

    def write_setup(self, cfg: ModelConfig, tcfg: TrainConfig, tokenizer) -> None:
        tokenizer.save(str(self.tokenizer))
        self.config.write_text(yaml.safe_dump({**cfg.to_dict(), "train": plain(dataclasses.asdict(tcfg))},
                                              sort_keys=False))

    def truncate_metrics(self, step: int, log: _Log | None = None) -> None:
        """Drop metric records past ``step`` (a crash after the last checkpoint is redone on resume); the
        kept records go to a new file renamed over the old one, so a crash here loses nothing."""
        truncate_metrics(self.metrics, step, log)

    def append_metrics(self, rec: dict) -> None:
        append_metric(self.metrics, rec)


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MB"


def _local_bytes(*trees: Any) -> int:
    """Bytes of this process's shards of the arrays in ``trees`` (what it writes to disk)."""
    total = 0
    for leaf in jax.tree.leaves(trees):
        if isinstance(leaf, jax.Array):
            total += sum(s.data.nbytes for s in leaf.addressable_shards if s.replica_id == 0)
        else:
            total += np.asarray(leaf).nbytes
    return total


def verify(step: int, restored: dict, meta: dict, where: Path) -> None:
    """:class:`CheckpointCorrupt` unless the restored ``{state[, ema]}`` match ``meta["fingerprint"]``
    (checkpoints written before fingerprints are accepted) and hold no inf/NaN."""
    want = meta.get("fingerprint") or {}
    for name, value in restored.items():
        if name in want and fingerprint(value) != want[name]:
            raise CheckpointCorrupt(f"checkpoint {where / str(step)}: its {name} arrays do not match the fingerprint "
                                    "written with them (bytes changed on disk)")
    bad = nonfinite_leaves(restored)
    if bad:
        raise CheckpointCorrupt(f"checkpoint {where / str(step)} holds inf/NaN in {len(bad)} arrays, e.g. {bad[0]}")


class Checkpoints:
    """Async Orbax checkpoints of ``{state, meta[, ema]}`` in ``run.checkpoints``, keeping the last ``keep``.

    A write that fails (full disk, I/O error) raises :class:`CheckpointWriteError` naming the folder and its
    free space, at the save that fails (free space is checked before each save; an error of the background
    write surfaces at the next save or ``wait``) with its partial temp folder removed."""

    def __init__(self, run: RunDir, keep: int):
        self.run = run
        self.mngr = ocp.CheckpointManager(run.checkpoints, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=True, create=True))
        self._pending: int | None = None

    def save(self, step: int, state: Any, meta: dict, ema: Any = None, wait: bool = False) -> None:
        trees = {"state": state} | ({"ema": ema} if ema is not None else {})
        self._surface(lambda: self.mngr.check_for_errors())
        need = _local_bytes(trees)
        if need * 1.05 + 2**20 > _free_bytes(self.run.checkpoints):
            self.wait()  # a write in flight finishes (or fails, reported as its own) before this one gives up
            if need * 1.05 + 2**20 > _free_bytes(self.run.checkpoints):
                self._fail(step, f"it needs about {_mb(need)}")
        meta = {**meta, "fingerprint": {k: fingerprint(v) for k, v in trees.items()}}
        items = {k: ocp.args.StandardSave(v) for k, v in trees.items()} | {"meta": ocp.args.JsonSave(meta)}
        self._pending = step
        self._surface(lambda: self.mngr.save(step, args=ocp.args.Composite(**items), force=True))
        if wait:
            self.wait()

    def _surface(self, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - any failed write: one clear line, partial files removed
            if self._pending is None:
                raise
            self._fail(self._pending, f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")

    def _fail(self, step: int, why: str) -> None:
        removed = []
        if jax.process_index() == 0 and self.run.checkpoints.is_dir():
            for p in self.run.checkpoints.iterdir():
                if p.name.startswith(f"{step}.") or p.name == str(step):  # its temp folder, or a partial one
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p.name)
        free = _free_bytes(self.run.checkpoints) if self.run.checkpoints.exists() else 0
        self._pending = None
        raise CheckpointWriteError(f"could not write the checkpoint of step {step} to {self.run.checkpoints} "
                                   f"({_mb(free)} free): {why}; "
                                   + (f"removed its partial files {removed}; " if removed else "")
                                   + "earlier checkpoints are intact -- free space (or lower "
                                   "train.keep_checkpoints) and rerun to resume")

    def restore_newest(self, abstract_state: Any, ema_like: Any, log: _Log):
        """The newest readable, verified checkpoint as ``(step, state, meta, ema)``, or None. Unreadable or
        corrupt ones are reported and moved to ``checkpoints_unreadable/`` (kept for inspection; the run
        then writes those steps afresh)."""
        bad, found = [], None
        for step in sorted(self.mngr.all_steps(), reverse=True):
            try:
                items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
                if ema_like is not None:
                    items["ema"] = ocp.args.StandardRestore(ema_like)
                r = self.mngr.restore(step, args=ocp.args.Composite(**items))
                arrays = {"state": r["state"]} | ({"ema": r["ema"]} if ema_like is not None else {})
                verify(step, arrays, r["meta"], self.run.checkpoints)
                found = step, r["state"], r["meta"], arrays.get("ema")
                break
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: fall back to the previous one
                log(f"checkpoint at step {step} is unreadable ({type(e).__name__}: {str(e)[:200]}); trying an older one")
                bad.append(step)
        if bad:
            move_aside(self.run, bad, log)
            self.mngr.reload()
        return found

    def wait(self) -> None:
        self._surface(self.mngr.wait_until_finished)
        self._pending = None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.mngr.close()


def move_aside(run: RunDir, steps: list[int], log: _Log) -> None:
    """Move these checkpoints to ``checkpoints_unreadable/<step>-<time>`` (process 0; all processes wait)."""
    if jax.process_index() == 0:
        aside = run.path / "checkpoints_unreadable"
        aside.mkdir(exist_ok=True)
        for step in steps:
            dst = aside / f"{step}-{int(time.time())}"
            shutil.move(str(run.checkpoints / str(step)), str(dst))
            log(f"moved the unreadable checkpoint {step} to {dst}")
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("deepseek_jax: unreadable checkpoints moved")


def _check_matches(cfg: ModelConfig, variables: dict, run: RunDir, step: int) -> None:
    """``ValueError`` naming ``config.yaml`` when the checkpoint's arrays are not the shapes its model makes."""
    made = jax.eval_shape(lambda: init_unboxed(cfg, jax.random.key(0)))
    exp, got = _shapes({k: made[k] for k in variables if k in made}), _shapes(variables)
    diff = [(k, got.get(k), exp.get(k)) for k in sorted(set(exp) | set(got)) if got.get(k) != exp.get(k)]
    if diff:
        path, have, need = diff[0]
        raise ValueError(f"{run.config} does not describe the checkpoint at step {step} ({len(diff)} arrays differ, "
                         f"e.g. {path}: checkpoint {have}, config.yaml makes {need}); restore the run's own "
                         "config.yaml")


def _shapes(t: Any) -> dict[str, tuple]:
    return {jax.tree_util.keystr(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_flatten_with_path(t)[0]}


def _restore_verified(run: RunDir, mngr: ocp.CheckpointManager, step: int) -> dict:
    """The state of ``step`` onto this process's first device (whatever mesh wrote it), verified."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                            mngr.item_metadata(step)["state"])
    r = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                   meta=ocp.args.JsonRestore()))
    verify(step, {"state": r["state"]}, r["meta"], run.checkpoints)
    return r["state"]


def load_run(path: str, step: int | None = None, log: _Log | None = None) -> tuple[ModelConfig, dict, Any]:
    """``(cfg, variables, tokenizer)`` from a ``deepseek-jax train`` run folder (its ``config.yaml``,
    ``tokenizer.json`` and the newest -- or ``step``'s -- checkpoint) or from a Hugging Face checkpoint
    directory (``config.json`` + safetensors; ``tokenizer.json`` when present, else None).

    Checkpoints are verified against their fingerprints. Without ``step``, an unreadable or corrupt newest
    checkpoint is reported (``log``) and the previous one used; the bad ones are moved to
    ``checkpoints_unreadable/`` unless a trainer holds the folder."""
    run = RunDir(path)
    if (run.path / "config.json").exists():
        tokenizer = load_tokenizer(run.tokenizer) if run.tokenizer.exists() else None
        cfg, variables = load_checkpoint(run.path)
        return cfg, variables, tokenizer
    if not run.config.exists() or not run.checkpoints.is_dir():
        raise FileNotFoundError(f"{run.path} is neither a training run folder (config.yaml + checkpoints/) nor a "
                                "Hugging Face checkpoint (config.json + *.safetensors)")
    tokenizer = load_tokenizer(run.tokenizer) if run.tokenizer.exists() else None
    cfg = config_from_dict(strip_train_section(read_yaml(run.config))[0])
    log = log or (lambda msg: None)
    mngr = ocp.CheckpointManager(run.checkpoints, item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                                 "meta": ocp.JsonCheckpointHandler()})
    try:
        steps = sorted(mngr.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"{run.checkpoints} holds no checkpoint yet")
        if step is not None and step not in steps:
            raise ValueError(f"no checkpoint at step {step} in {run.checkpoints} (have {sorted(steps)})")
        use, restored, bad = _newest_good(run, mngr, steps if step is None else [step], log)
    finally:
        mngr.close()
    if bad:
        _move_aside_if_free(run, bad, log)
    variables = {tree.PARAMS: restored[tree.PARAMS], tree.ROUTER: restored[tree.ROUTER]}
    _check_matches(cfg, variables, run, use)
    return cfg, jax.tree.map(jnp.asarray, variables), tokenizer


def _newest_good(run: RunDir, mngr: ocp.CheckpointManager, steps: list[int], log: _Log):
    """``(step, state, bad steps)``: the first of ``steps`` that restores and verifies."""
    bad, errors = [], []
    for s in steps:
        try:
            return s, _restore_verified(run, mngr, s), bad
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: try the previous one
            why = str(e).splitlines()[0][:200] if str(e) else ""
            log(f"checkpoint at step {s} is unreadable ({type(e).__name__}: {why}); trying an older one")
            bad.append(s)
            errors.append(f"step {s}: {type(e).__name__}: {why}")
    raise ValueError(f"no readable checkpoint in {run.checkpoints} ({'; '.join(errors)})")


def _move_aside_if_free(run: RunDir, bad: list[int], log: _Log) -> None:
    try:
        with RunLock(run.path):
            move_aside(run, bad, log)
    except RunLocked:
        log(f"not moving the unreadable checkpoints {bad} aside: a trainer holds {run.path}")
