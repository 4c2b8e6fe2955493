"""Greedy decoding, deepseek_jax vs transformers, each side in its own process, alternated, medians.

The same random DeepSeek-V3-style checkpoint (``_sides.SMALL_V3``, float32, written once with
``dsj.hf.save_checkpoint`` and loaded by both sides) decodes ``--new`` tokens after a ``--prompt``-token
prompt at each ``--batches`` size. Ours: ``dsj.generate`` (prefill + on-device decode loop); theirs:
``DeepseekV3ForCausalLM.generate(do_sample=False)``. Each round times ``--reps`` calls after one warm-up
call, per side; the table takes the median over ``--rounds`` rounds.

Roofline: the ours-process also measures the memory bandwidth (``analysis.roofline.memory_bandwidth``)
and prints every decode figure as a fraction of ``bandwidth / bytes per token`` (weights the step
touches -- shared and selected experts -- plus the cache up to the mean context).

    python benchmarks/decode_vs_torch.py [--batches 1 8] [--prompt 64] [--new 256] [--rounds 3]
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


def _prompts(batch: int, length: int, vocab: int):
    import numpy as np

    return np.random.default_rng(batch).integers(0, vocab, (batch, length)).tolist()


def side_export(args) -> dict:
    import deepseek_jax as dsj

    cfg = dsj.load_config(SMALL_V3[0], **SMALL_V3[1])
    dsj.hf.save_checkpoint(cfg, dsj.init_variables(cfg, 0), args.ckpt)
    return {"config": cfg.to_dict()}


def side_ours(args) -> dict:
    import deepseek_jax as dsj
    from deepseek_jax.analysis.roofline import decode_bytes, memory_bandwidth

    cfg, variables = dsj.hf.load_checkpoint(args.ckpt)
    bw = [memory_bandwidth()]
    out = {}
    for b in args.batches:
        prompts = _prompts(b, args.prompt, cfg.vocab_size)
        tokens = dsj.generate(cfg, variables, prompts, args.new, eos_id=-1)  # compiles
        times = []
        for _ in range(args.reps):
            t = time.perf_counter()
            dsj.generate(cfg, variables, prompts, args.new, eos_id=-1)
            times.append(time.perf_counter() - t)
        out[str(b)] = {"seconds": statistics.median(times), "tokens_per_s": b * args.new / statistics.median(times),
                       "first_row": tokens[0]}
    bw.append(memory_bandwidth())
    out["bandwidth"] = max(bw)
    for b in args.batches:
        need = decode_bytes(cfg, b, args.prompt + args.new // 2)["per_token"]
        out[str(b)]["bytes_per_token"] = need
    return out


def side_torch(args) -> dict:
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.ckpt, dtype=torch.float32).eval()
    out = {}
    for b in args.batches:
        ids = torch.tensor(_prompts(b, args.prompt, model.config.vocab_size))
        kw = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            first = model.generate(ids, **kw)[0, args.prompt:].tolist()
            times = []
            for _ in range(args.reps):
                t = time.perf_counter()
                model.generate(ids, **kw)
                times.append(time.perf_counter() - t)
        out[str(b)] = {"seconds": statistics.median(times), "tokens_per_s": b * args.new / statistics.median(times),
                       "first_row": first}
    out["torch_threads"] = torch.get_num_threads()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_side_args(ap)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if run_side(args, {"export": side_export, "ours": side_ours, "torch": side_torch}):
        return
    from _provenance import provenance

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = str(Path(tmp) / "ckpt")
        cfg = run_child(__file__, "export", ["--ckpt", ckpt])["config"]
        argv = ["--ckpt", ckpt, "--batches", *map(str, args.batches), "--prompt", str(args.prompt),
                "--new", str(args.new), "--reps", str(args.reps)]
        res = alternate(__file__, argv, args.rounds)
    bw = median_of(res["ours"], "bandwidth")
    rows = []
    for b in map(str, args.batches):
        ours, theirs = median_of(res["ours"], b, "tokens_per_s"), median_of(res["torch"], b, "tokens_per_s")
        need = res["ours"][0][b]["bytes_per_token"]
        same = [a == c for a, c in zip(res["ours"][0][b]["first_row"], res["torch"][0][b]["first_row"])]
        rows.append({"batch": int(b), "ours_tokens_per_s": ours, "torch_tokens_per_s": theirs, "ratio": ours / theirs,
                     "bytes_per_token": need, "roofline_tokens_per_s": bw / need,
                     "ours_roofline_fraction": ours * need / bw, "torch_roofline_fraction": theirs * need / bw,
                     "greedy_tokens_agree_until": same.index(False) if False in same else len(same)})
    print("| batch | deepseek_jax tok/s | transformers tok/s | ratio | roofline tok/s | ours / roofline |",
          file=sys.stderr)
    for r in rows:
        print(f"| {r['batch']} | {r['ours_tokens_per_s']:.0f} | {r['torch_tokens_per_s']:.0f} | {r['ratio']:.2f}x | "
              f"{r['roofline_tokens_per_s']:.0f} | {r['ours_roofline_fraction']:.0%} |", file=sys.stderr)
    print(json.dumps({"benchmark": "decode_vs_torch", "config": cfg, "prompt": args.prompt, "new_tokens": args.new,
                      "rounds": args.rounds, "bandwidth_bytes_per_s": bw, "results": rows, "raw": res,
                      **provenance()}, indent=1))


if __name__ == "__main__":
    main()
