"""Training step (forward + backward + AdamW), deepseek_jax vs transformers, each side in its own process,
alternated, medians.

Configs: ``tiny``, ``bench`` and ``small-v3`` (``_sides.SMALL_V3``, the speed issue's model), all with MTP
off (transformers' model has none), float32, ``--batch x --seq`` random tokens. Ours: the jitted train step
of ``train.make_train_fns`` (pre-training loss, backward, AdamW, bias update) on one device; theirs:
``DeepseekV3ForCausalLM`` (eager attention, ``grouped_mm`` experts) loaded from a checkpoint of
``init_variables(cfg, 0)``, loss + backward + grad clipping + ``torch.optim.AdamW`` (the losses printed are
not comparable: ours adds the balance terms and starts from the train step's own initialisation). Each round times ``--iters`` steps
after warm-up; the table takes the median over ``--rounds`` rounds.

Roofline: the ours-process measures the float32 matmul peak (``analysis.params.peak_flops``) and every
figure is also printed as ``tokens/s x FLOPs per token / peak`` (``analysis.params.flops_per_token``).

    python benchmarks/train_vs_torch.py [--configs tiny bench small-v3] [--batch 8] [--seq 256] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _sides import SMALL_V3, add_side_args, alternate, median_of, run_child, run_side  # noqa: E402

CONFIGS = {"tiny": ("tiny", {"mtp.depth": 0}), "bench": ("bench", {"mtp.depth": 0}), "small-v3": SMALL_V3}


def side_export(args) -> dict:
    import deepseek_jax as dsj

    out = {}
    for name in args.configs:
        cfg = dsj.load_config(CONFIGS[name][0], **CONFIGS[name][1])
        dsj.hf.save_checkpoint(cfg, dsj.init_variables(cfg, 0), Path(args.ckpt) / name)
        out[name] = cfg.to_dict()
    return out


def side_ours(args) -> dict:
    import deepseek_jax as dsj
    from _train_step import step_timer
    from deepseek_jax import train as T

    peak, _ = T.peak_flops()
    out = {"peak_flops": peak}
    for name in args.configs:
        cfg = dsj.load_config(CONFIGS[name][0], **CONFIGS[name][1])
        run = step_timer(cfg, args.batch, args.seq)
        run()
        run()
        times, m = [], None
        for _ in range(args.iters):
            sec, m = run()
            times.append(sec)
        sec = statistics.median(times)
        out[name] = {"step_s": sec, "tokens_per_s": args.batch * args.seq / sec, "loss": float(m["loss"]),
                     "flops_per_token": T.flops_per_token(cfg, args.seq)}
    return out


def side_torch(args) -> dict:
    import numpy as np
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    out = {"torch_threads": torch.get_num_threads()}
    for name in args.configs:
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_pretrained(Path(args.ckpt) / name, dtype=torch.float32,
                                                                  attn_implementation="eager").train()
        try:
            model.set_experts_implementation("grouped_mm")
        except Exception:  # noqa: BLE001 - older transformers: their default
            pass
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        toks = torch.as_tensor(np.random.default_rng(0).integers(0, model.config.vocab_size, (args.batch, args.seq)))

        def step():
            loss = model(toks, labels=toks).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss)

        step()
        step()
        times = []
        for _ in range(args.iters):
            t = time.perf_counter()
            loss = step()
            times.append(time.perf_counter() - t)
        sec = statistics.median(times)
        out[name] = {"step_s": sec, "tokens_per_s": args.batch * args.seq / sec, "loss": loss}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_side_args(ap)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if run_side(args, {"export": side_export, "ours": side_ours, "torch": side_torch}):
        return
    from _provenance import provenance

    with tempfile.TemporaryDirectory() as tmp:
        argv = ["--ckpt", tmp, "--configs", *args.configs]
        cfgs = run_child(__file__, "export", argv)
        res = alternate(__file__, argv + ["--batch", str(args.batch), "--seq", str(args.seq),
                                          "--iters", str(args.iters)], args.rounds)
    peak = median_of(res["ours"], "peak_flops")
    rows = []
    for name in args.configs:
        ours, theirs = median_of(res["ours"], name, "tokens_per_s"), median_of(res["torch"], name, "tokens_per_s")
        fpt = res["ours"][0][name]["flops_per_token"]
        rows.append({"config": name, "ours_tokens_per_s": ours, "torch_tokens_per_s": theirs, "ratio": ours / theirs,
                     "ours_step_ms": 1e3 * args.batch * args.seq / ours, "torch_step_ms": 1e3 * args.batch * args.seq / theirs,
                     "flops_per_token": fpt, "ours_peak_fraction": ours * fpt / peak,
                     "torch_peak_fraction": theirs * fpt / peak})
    print("| config | deepseek_jax ms/step | transformers ms/step | ratio | ours / fp32 peak |", file=sys.stderr)
    for r in rows:
        print(f"| {r['config']} | {r['ours_step_ms']:.0f} | {r['torch_step_ms']:.0f} | {r['ratio']:.2f}x | "
              f"{r['ours_peak_fraction']:.0%} |", file=sys.stderr)
    print(json.dumps({"benchmark": "train_vs_torch", "configs": cfgs, "batch": args.batch, "seq": args.seq,
                      "rounds": args.rounds, "peak_flops": peak, "results": rows, "raw": res, **provenance()},
                     indent=1))


if __name__ == "__main__":
    main()
