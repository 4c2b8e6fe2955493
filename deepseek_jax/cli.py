"""``deepseek-jax`` command line: ``train`` (the main job), post-training (``sft``, ``grpo``, ``sample``, ``distill``),
``generate``, ``eval``, ``info`` (sizes; with ``--mesh`` a layout report) and ``plan`` (a TPU slice, compiled here)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import jax

from deepseek_jax.analysis.layout import format_report
from deepseek_jax.analysis.params import model_info
from deepseek_jax.analysis.pipeline import parse_pipeline, pipeline_report
from deepseek_jax.config import load_config
from deepseek_jax.config_io import parse_overrides
from deepseek_jax.eval.long_context import (document_windows, niah_eval, parse_depths, perplexity_by_position,
                                            with_yarn, write_niah)
from deepseek_jax.hf import config_from_hf
from deepseek_jax.infer.engine import generate
from deepseek_jax.parallel.mesh import make_mesh, mesh_size, parse_mesh
from deepseek_jax.post_train.config import load_post_config
from deepseek_jax.post_train.distill import run_distill
from deepseek_jax.post_train.grpo_run import run_grpo
from deepseek_jax.post_train.prompts import read_records, training_prompts
from deepseek_jax.post_train.rewards import RewardError, Rewards
from deepseek_jax.post_train.sample import sample_records, write_jsonl
from deepseek_jax.post_train.sft import run_sft
from deepseek_jax.train.config import load_run_config
from deepseek_jax.train.corpus import read_documents
from deepseek_jax.train.data import DataConfig, eos_id, split_documents
from deepseek_jax.train.lock import RunLocked
from deepseek_jax.train.loop import TrainingDiverged, train
from deepseek_jax.train.plan import PlanUnavailable, format_plan, format_search, plan, search, topology_devices
from deepseek_jax.train.run_dir import CheckpointCorrupt, CheckpointWriteError, RunDir, load_run
from deepseek_jax.train.step import step_layout_report
from deepseek_jax.train.synthetic import NIAHConfig

__all__ = ["main"]


def _fake_cpu_devices(n: int) -> None:
    """On a CPU-only machine, expose ``n`` devices (must run before JAX initialises its backend: importing
    jax and this package does not, the first ``jax.devices()`` does)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def _positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be >= 1")
    return v


def _log(msg: str) -> None:
    print(f"deepseek-jax: {msg}", file=sys.stderr)


def _info(args: argparse.Namespace) -> int:
    if args.mesh and not args.topology:
        _fake_cpu_devices(mesh_size(args.mesh))
    cfg = load_config(args.config) if args.config else config_from_hf(args.hf)
    if args.pipeline:
        return _pipeline(cfg, args)
    if args.mesh:
        return _layout(cfg, args)
    info = model_info(cfg)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    src = args.config or args.hf
    print(f"{src}: {cfg.n_layers} layers, d_model {cfg.d_model}, attention {cfg.attention.kind}"
          + (f", {cfg.moe.n_routed_experts} routed experts (top-{cfg.moe.experts_per_token})" if cfg.moe else "")
          + (f", MTP depth {cfg.mtp.depth}" if cfg.mtp.depth else ""))
    rows = [("parameters, total", f"{info['params_total']:,} ({info['params_total'] / 1e9:.2f}B)"),
            ("parameters, active per token", f"{info['params_active']:,} ({info['params_active'] / 1e9:.2f}B)"),
            ("parameters, MTP modules", f"{info['params_mtp']:,} ({info['params_mtp'] / 1e9:.2f}B)"),
            ("KV cache per token per layer (bf16)", f"{info['kv_cache_bytes_per_token_per_layer']:,g} B"),
            ("KV cache per token, all layers (bf16)", f"{info['kv_cache_bytes_per_token']:,g} B"),
            ("eval_shape time", f"{info['eval_shape_seconds']} s")]
    for n, c in (info["decode_keys_per_step"] or {}).items():
        extra = f"; indexer keys {c['indexer']:,}" if "indexer" in c else ""
        rows.append((f"keys read per decode step at {n:,} ({cfg.attention.sparse.kind})",
                     f"{c['sparse']:,} (dense {c['dense']:,}, {c['sparse'] / c['dense']:.1%}{extra})"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    return 0


def _pipeline(cfg, args: argparse.Namespace) -> int:
    name, micro = parse_pipeline(args.pipeline)
    ranks = parse_mesh(args.mesh or "").get("stage", 1)
    if ranks < 2:
        raise ValueError("--pipeline needs a stage axis in --mesh, e.g. --mesh stage=4")
    r = pipeline_report(cfg, name, ranks, micro)
    if args.json:
        print(json.dumps(r, indent=1))
        return 0
    split = r["moe_layers_per_stage"]
    print(f"{name}, {ranks} ranks, {micro} micro-batches: {r['stages']} stages of {split} MoE layers (embedding + "
          f"{r['dense_layers_before_stage_0']} dense layers before stage 0; head + MTP after stage {r['stages'] - 1})")
    uneven = " (uneven: padded to the longest stage)" if len(set(split)) > 1 else ""
    print(f"  parameters: {r['stage_param_bytes'] / 1e6:,.1f} MB per stage{uneven}, "
          f"{r['shared_param_bytes'] / 1e6:,.1f} MB shared (replicated over stage)")
    for rank, (held, nbytes, bubble, peak) in enumerate(zip(r["stages_per_rank"], r["rank_param_bytes"], r["bubble"],
                                                          r["peak_activations"])):
        print(f"  rank {rank}: stages {held}, {nbytes / 1e6:,.1f} MB, bubble {bubble:g} (F = 1, B = 2), "
              f"peak activations {peak}")
    print(f"  bubble fraction {r['bubble_fraction']:.1%}, lock-step ticks {r['ticks']:g}")
    return 0


def _layout(cfg, args: argparse.Namespace) -> int:
    axes, devices = parse_mesh(args.mesh), topology_devices(args.topology) if args.topology else jax.devices()
    mesh = make_mesh(axes, devices[:mesh_size(axes)] if devices[0].platform == "cpu" else devices)
    report = step_layout_report(cfg, mesh, batch=args.batch, seq=args.seq, remat=args.remat, compile=not args.no_step)
    print(json.dumps(report, indent=1, default=str) if args.json else format_report(report))
    return 0


def _train(args: argparse.Namespace) -> int:
    cfg, tcfg = load_run_config(args.config, _run_overrides(args))  # the mesh: from the YAML or an override
    devices = mesh_size(tcfg.mesh) if tcfg.mesh else 0
    if args.num_processes > 1 or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        if os.environ.get("JAX_PLATFORMS", "") in ("", "cpu"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
        if devices:
            _fake_cpu_devices(devices // max(args.num_processes, 1))
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
    elif devices:
        _fake_cpu_devices(devices)
    init = None
    if args.init:
        _, init, tok = load_run(args.init, log=_log)
        if tcfg.data.kind == "text" and not tcfg.data.tokenizer and tok is not None:
            tcfg = tcfg.replace(data={"tokenizer": str(RunDir(args.init).tokenizer)})  # keep the token ids
    try:
        summary = train(cfg, tcfg, progress=not args.no_progress, init=init)
    except TrainingDiverged as e:
        print(f"deepseek-jax train: {e}", file=sys.stderr)
        return 3
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "sample"}, indent=1, default=str))
    return 0


def _run_overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.overrides)
    for flag, key in (("steps", "train.steps"), ("out", "train.out"), ("mesh", "train.mesh")):
        if getattr(args, flag, None) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    return overrides


def _init(cfg, path: str | None):
    """``(variables, tokenizer)`` of ``--init`` (a run folder or a Hugging Face checkpoint), or ``(None, None)``;
    its model must be the config's."""
    if not path:
        return None, None
    cfg0, variables, tok = load_run(path, log=_log)
    if cfg0 != cfg:
        raise ValueError(f"--init {path} holds a different model than the config's (compare {path}/config.yaml with "
                         "--config): post-training keeps the architecture; use the same model fields")
    return variables, tok


def _post(args: argparse.Namespace) -> int:
    cfg, tcfg, pcfg = load_post_config(args.config, _run_overrides(args), stage=args.command)
    if tcfg.mesh:
        _fake_cpu_devices(mesh_size(tcfg.mesh))
    try:
        if args.command == "distill":
            teacher = args.teacher or pcfg.distill.teacher
            if not teacher:
                raise ValueError("distill needs a teacher: --teacher DIR or distill.teacher in the config")
            variables, _ = _init(cfg, args.init)
            summary = run_distill(cfg, tcfg, pcfg, teacher, init=variables, progress=not args.no_progress)
        else:
            variables, tok = _init(cfg, args.init)
            run = run_sft if args.command == "sft" else run_grpo
            summary = run(cfg, tcfg, pcfg, init=variables, tokenizer=tok, progress=not args.no_progress)
    except TrainingDiverged as e:
        print(f"deepseek-jax {args.command}: {e}", file=sys.stderr)
        return 3
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "sample"}, indent=1, default=str))
    return 0


def _sample(args: argparse.Namespace) -> int:
    cfg, tcfg, pcfg = load_post_config(args.config, args.overrides)
    variables, tok = _init(cfg, args.init)
    if tok is None:
        raise ValueError(f"{args.init} has no tokenizer.json to encode the prompts with")
    records = (read_records(args.prompts, ["prompt"], "--prompts") if args.prompts
               else training_prompts(pcfg, args.num_prompts, pcfg.task.train_seed))
    specs = [{"fn": f, "weight": 1.0} for f in args.reward] or [dataclasses.asdict(r) for r in pcfg.reward]
    rows = sample_records(cfg, variables, tok, records, args.n, args.max_new_tokens or pcfg.grpo.max_completion_tokens,
                          temperature=args.temperature, seed=args.seed, eos_id=eos_id(tok),
                          rewards=Rewards.from_specs(specs) if specs else None, keep=args.keep,
                          progress=not args.no_progress)
    path = write_jsonl(rows, args.out)
    scored = [r["reward"] for r in rows if r.get("reward") is not None]
    _log(f"wrote {len(rows)} of {len(records) * args.n} samples to {path}"
         + (f" (mean reward {sum(scored) / len(scored):.3f})" if scored else ""))
    return 0


def _generate(args: argparse.Namespace) -> int:
    cfg, variables, tok = load_run(args.checkpoint, log=_log)
    if tok is None:
        raise ValueError(f"{args.checkpoint} has no tokenizer.json beside the checkpoint; cannot encode the prompt")
    ids = tok.encode(args.prompt).ids
    if not ids:
        raise ValueError("the prompt encodes to no tokens; give some text")
    eos = tok.token_to_id("<|endoftext|>") if cfg.eos_token_id is None else cfg.eos_token_id
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    produced: list[int] = []
    shown = [""]

    def stream(new: list[list[int]]) -> None:  # decode the whole continuation, print what is new
        produced.extend(new[0])
        text = tok.decode(produced)
        if text.startswith(shown[0]):
            sys.stdout.write(text[len(shown[0]):])
            sys.stdout.flush()
            shown[0] = text

    stats: dict = {}
    t0 = time.perf_counter()
    generate(cfg, variables, [ids], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
             top_p=args.top_p, seed=args.seed, speculative=args.speculative, eos_id=eos, on_tokens=stream,
             stats=stats)
    dt = time.perf_counter() - t0
    sys.stdout.write("\n")
    msg = f"[{len(produced)} tokens in {dt:.2f} s ({len(produced) / dt:.1f} tokens/s incl. compilation)"
    if args.speculative and stats.get("acceptance_rate") is not None:
        msg += f"; draft acceptance {stats['acceptance_rate']:.2f}, {stats['tokens_per_forward']:.2f} tokens/forward"
    print(msg + "]", file=sys.stderr)
    return 0


def _post_parsers(sub) -> None:
    """The post-training commands: sft, grpo, distill and sample."""
    for name, what in (("sft", "supervised fine-tuning on prompt/completion pairs (loss on the completion)"),
                       ("grpo", "GRPO reinforcement learning against reward functions"),
                       ("distill", "distil a teacher run into the config's (smaller) model: seq, logit or on_policy")):
        c = sub.add_parser(name, help=what)
        if name == "distill":
            c.add_argument("--teacher", help="the teacher's run folder or Hugging Face checkpoint (distill.teacher)")
        c.add_argument("--config", default="configs/r1-addition.yaml", help="preset: model, train:, sft:/grpo:/...")
        c.add_argument("--init", help="start from this run folder or Hugging Face checkpoint (same model)")
        c.add_argument("--steps", type=int, help="override train.steps")
        c.add_argument("--out", help="override train.out (an existing run there is resumed)")
        c.add_argument("--mesh", help="e.g. data=2,expert=2 (fakes CPU devices if needed)")
        c.add_argument("--no-progress", action="store_true", help="no progress bar")
        c.add_argument("--json", action="store_true", help="print the summary as JSON at the end")
        c.add_argument("overrides", nargs="*", help="key=value overrides, e.g. grpo.beta=0.04 train.steps=50")
        c.set_defaults(fn=_post)

    sp = sub.add_parser("sample", help="n completions per prompt, scored and filtered (rejection sampling) to JSONL")
    sp.add_argument("--config", default="configs/r1-addition.yaml", help="preset (model, task:, reward:, grpo:)")
    sp.add_argument("--init", required=True, help="the run folder or Hugging Face checkpoint to sample from")
    sp.add_argument("--prompts", help="a JSONL of {prompt, ...columns}; default: the task's training prompts")
    sp.add_argument("--num-prompts", type=_positive, help="training prompts (default: task.sft_examples or all)")
    sp.add_argument("--n", type=_positive, default=8, help="completions per prompt")
    sp.add_argument("--temperature", type=float, default=1.0)
    sp.add_argument("--max-new-tokens", type=_positive, help="default grpo.max_completion_tokens")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--reward", action="append", default=[], help="module:function or file.py:function (repeatable)")
    sp.add_argument("--keep", help="a filter such as reward==1 (rejection sampling)")
    sp.add_argument("--out", required=True, help="the JSONL to write")
    sp.add_argument("--no-progress", action="store_true")
    sp.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    sp.set_defaults(fn=_sample)


def _eval_parsers(sub) -> None:
    """``eval niah`` and ``eval ppl`` (long-context.md §5)."""
    ev = sub.add_parser("eval", help="long-context evaluation: needle in a haystack, perplexity by position")
    kinds = ev.add_subparsers(dest="eval_kind", required=True)
    for name, what in (("niah", "needle-in-a-haystack grid -> niah.json, niah.png"),
                       ("ppl", "perplexity by position on held-out documents -> ppl.json")):
        e = kinds.add_parser(name, help=what)
        e.add_argument("--checkpoint", required=True, help="a run folder or Hugging Face checkpoint")
        e.add_argument("--lengths", required=True, help="comma-separated context lengths, e.g. 128,256,512,1024")
        e.add_argument("--yarn-factor", type=float, help="evaluate with YaRN of this factor s (with --yarn-original)")
        e.add_argument("--yarn-original", type=int, help="YaRN's original context (the training length)")
        e.add_argument("--batch", type=_positive, default=16, help="sequences per forward")
        e.add_argument("--out", required=True, help="the folder to write into")
        e.add_argument("--no-progress", action="store_true")
        if name == "niah":
            e.add_argument("--task", help="passkey | kv | multikey | multivalue | multiquery (default: the run's "
                           "train.data.niah.task, else kv)")
            e.add_argument("--depths", default="0:100:11", help="start:stop:count or a comma list, in percent")
            e.add_argument("--samples", type=_positive, default=50, help="needles per cell")
            e.add_argument("--seed", type=int, default=0)
            e.add_argument("--scoring", default="argmax", help="argmax (one teacher-forced forward) or generate "
                           "(greedy through the KV cache)")
            e.add_argument("--no-plot", action="store_true", help="skip niah.png")
        else:
            e.add_argument("--data", action="append", default=[], help="held-out text (files, folders, globs, "
                           ".jsonl; repeatable); default: the run's validation documents")
            e.add_argument("--max-rows", type=_positive, default=64, help="documents per length")
            e.add_argument("--bins", type=_positive, default=8, help="position bins")
        e.set_defaults(fn=_eval)


def _eval(args: argparse.Namespace) -> int:
    cfg, variables, tok = load_run(args.checkpoint, log=_log)
    if (args.yarn_factor is None) != (args.yarn_original is None):
        raise ValueError("give --yarn-factor and --yarn-original together")
    if args.yarn_factor is not None:
        cfg = with_yarn(cfg, args.yarn_factor, args.yarn_original)
    lengths = [int(x) for x in args.lengths.split(",")]
    run_cfg = RunDir(args.checkpoint).config
    tcfg = load_run_config(str(run_cfg))[1] if run_cfg.exists() else None
    out = Path(args.out)
    if args.eval_kind == "niah":
        niah = tcfg.data.niah if tcfg is not None else NIAHConfig()
        res = niah_eval(cfg, variables, task=args.task or niah.task, lengths=lengths, depths=parse_depths(args.depths),
                        samples=args.samples, seed=args.seed, scoring=args.scoring, batch=args.batch,
                        filler_words=niah.filler_words, train_length=tcfg.seq_len if tcfg else None,
                        progress=not args.no_progress)
        paths = write_niah(res, out, plot=not args.no_plot)
        _log(f"exact match by length {res['by_length']} ({res['seconds']} s); wrote {', '.join(map(str, paths))}")
        return 0
    if tok is None:
        raise ValueError(f"{args.checkpoint} has no tokenizer.json to encode the held-out text with")
    data = DataConfig(sources=tuple(args.data)) if args.data else (tcfg.data if tcfg else DataConfig())
    if data.kind != "text":
        raise ValueError("eval ppl needs text: give --data (the run trained on synthetic data)")
    docs = read_documents(data.sources, data.text_field, data.max_document_chars)
    held = docs if args.data else split_documents(docs, data.val_fraction, tcfg.seed if tcfg else 0)[1]
    ids = [e.ids for e in tok.encode_batch(held)]
    res = {str(L): perplexity_by_position(cfg, variables, document_windows(ids, L, args.max_rows), args.bins,
                                          args.batch) for L in lengths}
    out.mkdir(parents=True, exist_ok=True)
    (out / "ppl.json").write_text(json.dumps(res, indent=1) + "\n")
    _log(f"mean NLL by length { {k: round(v['nll'], 4) for k, v in res.items()} }; wrote {out / 'ppl.json'}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    cfg, kw = load_config(args.config, **parse_overrides(args.overrides)), dict(seq=args.seq, moments=args.moments,
                                                                                fp8=args.fp8)
    if args.search:
        pipes = tuple(filter(None, (args.pipeline or "").split(",")))
        r = search(cfg, args.topology, args.batch, max_compiles=args.max_compiles, pipelines=pipes, cache=args.cache,
                   jobs=args.jobs, progress=lambda i, n, mesh, how: _log(f"compiling {i + 1}/{n}: {mesh}, {how}"), **kw)
    else:
        sched, micro = parse_pipeline(args.pipeline) if args.pipeline else ("none", 1)
        r = plan(cfg, args.topology, args.mesh, args.batch, remat=args.remat, pipeline=sched, microbatches=micro, **kw)
    print(json.dumps(r, indent=1, default=float) if args.json else (format_search if args.search else format_plan)(r))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deepseek-jax", description="DeepSeek models in JAX/Flax")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="parameter counts and KV-cache bytes (nothing is allocated)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="a preset name or YAML path, e.g. configs/tiny.yaml")
    src.add_argument("--hf", help="a Hugging Face checkpoint directory or config.json")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--mesh", help="report a layout, e.g. data=2,expert=2,tensor=2 (fakes CPU devices if needed)")
    p.add_argument("--batch", type=_positive, default=8, help="global batch of the step analysed with --mesh")
    p.add_argument("--seq", type=_positive, default=128, help="sequence length of the step analysed with --mesh")
    p.add_argument("--no-step", action="store_true", help="with --mesh: skip compiling the training step")
    p.add_argument("--topology", help="with --mesh: lay out over a TPU slice's devices, compiled here (e.g. v5p:2x2x2)")
    p.add_argument("--pipeline", help="with --mesh stage=N: stage split, bytes per rank, bubble, activation peak of "
                   "SCHEDULE:MICROBATCHES, e.g. dualpipev:8 (gpipe, 1f1b, interleaved_1f1b, zb_h1, dualpipe(v))")
    p.add_argument("--remat", default="none", help="with --mesh: the training step's recomputation policy "
                   "(train.remat: none, full or deepseek)")
    p.set_defaults(fn=_info)

    pl = sub.add_parser("plan", help="compile the train step for a TPU slice here: memory vs HBM, FLOPs, roofline")
    pl.add_argument("--config", required=True, help="a preset name or YAML path, e.g. deepseek-v3-671b")
    pl.add_argument("--topology", required=True, help="e.g. v5p:4x4x4, v5e:16x16, v6e:4x4, v4:2x2x1")
    pl.add_argument("--mesh", help="axes over the slice's devices, e.g. fsdp=8,expert=8 (default: all fsdp)")
    pl.add_argument("--batch", type=int, default=0, help="global batch (default: one row per device)")
    pl.add_argument("--seq", type=_positive, default=4096)
    pl.add_argument("--remat", default="full", help="none, full or deepseek")
    pl.add_argument("--fp8", action="store_true", help="the model's FP8 recipe on (fp8.enabled)")
    pl.add_argument("--moments", default="float32", help="AdamW moments dtype (float32 or bfloat16)")
    pl.add_argument("--pipeline", help="SCHEDULE:MICROBATCHES over the mesh's stage axis, e.g. 1f1b:8; with --search, "
                    "schedules to try over stage axes, e.g. 1f1b,dualpipev (every count) or 1f1b:8")
    pl.add_argument("--search", action="store_true", help="rank layouts x remat (x --pipeline): compile the best")
    pl.add_argument("--max-compiles", type=_positive, default=4)
    pl.add_argument("--cache", help="with --search: a folder of compiled plans (reruns compile only what is new)")
    pl.add_argument("--jobs", type=_positive, default=1, help="with --search: compiles at once (processes)")
    pl.add_argument("--json", action="store_true", help="print JSON")
    pl.add_argument("overrides", nargs="*", help="model key=value overrides, e.g. moe.capacity_factor=1.25")
    pl.set_defaults(fn=_plan)

    t = sub.add_parser("train", help="train (or resume) a model: the project's main job")
    t.add_argument("--config", default="configs/tiny.yaml", help="preset name or YAML path (model + train: section)")
    t.add_argument("--steps", type=int, help="override train.steps")
    t.add_argument("--out", help="override train.out (the run folder; an existing run there is resumed)")
    t.add_argument("--mesh", help="e.g. data=2,expert=2,tensor=2 (fakes CPU devices if needed)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--json", action="store_true", help="print the run summary as JSON at the end")
    t.add_argument("--coordinator", help="multi-process: host:port of process 0 (jax.distributed)")
    t.add_argument("--num-processes", type=int, default=1)
    t.add_argument("--process-id", type=int, default=0)
    t.add_argument("--init", help="start from this run folder's newest checkpoint (or a Hugging Face checkpoint): "
                   "e.g. a context extension, the same weights under a YaRN rope (fresh optimiser, step 0)")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.batch_size=16 moe.n_routed_experts=8")
    t.set_defaults(fn=_train)

    _post_parsers(sub)
    _eval_parsers(sub)

    g = sub.add_parser("generate", help="stream a continuation of a prompt (KV cache, absorbed MLA)")
    g.add_argument("--checkpoint", required=True,
                   help="a `deepseek-jax train` run folder (e.g. runs/tiny) or a Hugging Face checkpoint directory")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=_positive, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--speculative", action="store_true", help="draft with the MTP module, verify in one forward")
    g.set_defaults(fn=_generate)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, RunLocked, CheckpointWriteError, CheckpointCorrupt, RewardError,
            PlanUnavailable) as e:
        print(f"deepseek-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
