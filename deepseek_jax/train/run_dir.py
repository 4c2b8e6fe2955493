"""The run folder, its ONE owner: ``config.yaml``, ``tokenizer.json``, ``metrics.jsonl`` and the Orbax
checkpoints under ``checkpoints/`` are written and read here (by ``train`` and by ``generate``).

Layout::

    out/config.yaml          the model config and the train: section
    out/tokenizer.json       the byte-level BPE the run trained (or was given)
    out/metrics.jsonl        one JSON record per logged step ({"step", "kind": "train"|"val", ...})
    out/tensorboard/         the same scalars for TensorBoard
    out/checkpoints/<step>/  state (params, router, opt_state, step), meta (data position), ema
    out/checkpoints_unreadable/<step>-<time>/   checkpoints that failed to restore, kept for inspection
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import yaml
from jax.experimental import multihost_utils

from deepseek_jax.config import ModelConfig, config_from_dict
from deepseek_jax.config_io import plain, read_yaml, strip_train_section
from deepseek_jax.hf import load_checkpoint
from deepseek_jax.nn import tree
from deepseek_jax.train.config import TrainConfig
from deepseek_jax.train.data import load_tokenizer

__all__ = ["RunDir", "Checkpoints", "load_run"]


class RunDir:
    """A run folder ``out``: checks it can be written and holds this model, writes the set-up files."""

    def __init__(self, out: str | Path):
        self.path = Path(out).resolve()
        self.config = self.path / "config.yaml"
        self.tokenizer = self.path / "tokenizer.json"
        self.metrics = self.path / "metrics.jsonl"
        self.tensorboard = self.path / "tensorboard"
        self.checkpoints = self.path / "checkpoints"

    def check(self, cfg: ModelConfig) -> None:
        """``ValueError`` if the folder is not writable or holds a run of another model."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write-test-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise ValueError(f"train.out={str(self.path)!r} is not a writable folder ({e.strerror}); "
                             "choose another") from None
        if self.config.exists():
            old, _ = strip_train_section(read_yaml(self.config))
            if old != yaml.safe_load(yaml.safe_dump(cfg.to_dict())):
                raise ValueError(f"train.out={str(self.path)!r} holds a run of a different model (see {self.config}); "
                                 "resume it with the same model config, or choose another train.out")

    def write_setup(self, cfg: ModelConfig, tcfg: TrainConfig, tokenizer) -> None:
        tokenizer.save(str(self.tokenizer))
        self.config.write_text(yaml.safe_dump({**cfg.to_dict(), "train": plain(dataclasses.asdict(tcfg))},
                                              sort_keys=False))

    def truncate_metrics(self, step: int) -> None:
        """Drop metric records past ``step`` (a crash after the last checkpoint is redone on resume)."""
        if self.metrics.exists():
            keep = [ln for ln in self.metrics.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= step]
            self.metrics.write_text("".join(k + "\n" for k in keep))

    def append_metrics(self, rec: dict) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(rec) + "\n")


class Checkpoints:
    """Async Orbax checkpoints of ``{state, meta[, ema]}`` in ``run.checkpoints``, keeping the last ``keep``."""

    def __init__(self, run: RunDir, keep: int):
        self.run = run
        self.mngr = ocp.CheckpointManager(run.checkpoints, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=True, create=True))

    def save(self, step: int, state: Any, meta: dict, ema: Any = None, wait: bool = False) -> None:
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if ema is not None:
            items["ema"] = ocp.args.StandardSave(ema)
        self.mngr.save(step, args=ocp.args.Composite(**items), force=True)
        if wait:
            self.mngr.wait_until_finished()

    def restore_newest(self, abstract_state: Any, ema_like: Any, log: Callable[[str], None]):
        """The newest readable checkpoint as ``(step, state, meta, ema)``, or None. Unreadable ones are
        reported and moved to ``checkpoints_unreadable/`` (kept for inspection; the run then writes those
        steps afresh)."""
        bad, found = [], None
        for step in sorted(self.mngr.all_steps(), reverse=True):
            try:
                items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
                if ema_like is not None:
                    items["ema"] = ocp.args.StandardRestore(ema_like)
                r = self.mngr.restore(step, args=ocp.args.Composite(**items))
                found = step, r["state"], r["meta"], r.get("ema") if ema_like is not None else None
                break
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: fall back to the previous one
                log(f"checkpoint at step {step} is unreadable ({type(e).__name__}: {str(e)[:200]}); trying an older one")
                bad.append(step)
        if bad:
            self._move_aside(bad, log)
        return found

    def _move_aside(self, steps: list[int], log: Callable[[str], None]) -> None:
        if jax.process_index() == 0:
            aside = self.run.path / "checkpoints_unreadable"
            aside.mkdir(exist_ok=True)
            for step in steps:
                dst = aside / f"{step}-{int(time.time())}"
                shutil.move(str(self.run.checkpoints / str(step)), str(dst))
                log(f"moved the unreadable checkpoint {step} to {dst}")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("deepseek_jax: unreadable checkpoints moved")
        self.mngr.reload()

    def wait(self) -> None:
        self.mngr.wait_until_finished()

    def close(self) -> None:
        self.mngr.wait_until_finished()
        self.mngr.close()


def load_run(path: str, step: int | None = None) -> tuple[ModelConfig, dict, Any]:
    """``(cfg, variables, tokenizer)`` from a ``deepseek-jax train`` run folder (its ``config.yaml``,
    ``tokenizer.json`` and the newest -- or ``step``'s -- checkpoint) or from a Hugging Face checkpoint
    directory (``config.json`` + safetensors; ``tokenizer.json`` when present, else None)."""
    run = RunDir(path)
    tokenizer = load_tokenizer(run.tokenizer) if run.tokenizer.exists() else None
    if (run.path / "config.json").exists():
        cfg, variables = load_checkpoint(run.path)
        return cfg, variables, tokenizer
    if not run.config.exists() or not run.checkpoints.is_dir():
        raise FileNotFoundError(f"{run.path} is neither a training run folder (config.yaml + checkpoints/) nor a "
                                "Hugging Face checkpoint (config.json + *.safetensors)")
    cfg = config_from_dict(strip_train_section(read_yaml(run.config))[0])
    mngr = ocp.CheckpointManager(run.checkpoints)
    steps = sorted(mngr.all_steps())
    if not steps:
        raise FileNotFoundError(f"{run.checkpoints} holds no checkpoint yet")
    use = steps[-1] if step is None else step
    if use not in steps:
        raise ValueError(f"no checkpoint at step {step} in {run.checkpoints} (have {steps})")
    restored = mngr.restore(use, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    mngr.close()
    variables = {tree.PARAMS: restored[tree.PARAMS], tree.ROUTER: restored[tree.ROUTER]}
    return cfg, jax.tree.map(jnp.asarray, variables), tokenizer
