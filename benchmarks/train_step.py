"""Train-step throughput and MFU: deepseek_jax vs transformers' PyTorch DeepSeek-V3, same config, same run.

For each preset (default ``tiny`` and ``bench``): our jitted train step (``train.make_train_fns``: forward,
MTP and balance losses, backward, AdamW, bias update) on one device, and ``DeepseekV3ForCausalLM``
(``experts_implementation="grouped_mm"``, eager attention, fp32) doing forward, backward and
``torch.optim.AdamW``, both at ``--batch x --seq`` tokens. The MTP depth is set to 0 for both (the
transformers model has no MTP). MFU = model FLOPs/token (``train.flops_per_token``) x tokens/s over the
fp32 matmul peak measured in this run. Prints JSON with config, git SHA and versions.

    python benchmarks/train_step.py [--configs tiny bench] [--batch 8] [--seq 256] [--iters 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402

import deepseek_jax as dsj  # noqa: E402
from _provenance import provenance  # noqa: E402
from _train_step import step_timer  # noqa: E402
from deepseek_jax import train as T  # noqa: E402


def ours(cfg, batch: int, seq: int, iters: int, remat: str) -> dict:
    run = step_timer(cfg, batch, seq, remat)
    compile_s, _ = run()
    times = []
    for _ in range(iters + 1):
        sec, m = run()
        times.append(sec)
    sec = statistics.median(times[1:])
    return {"step_s": sec, "tokens_per_s": batch * seq / sec, "compile_s": compile_s, "loss": float(m["loss"])}


def pytorch(cfg, batch: int, seq: int, iters: int, threads: int) -> dict:
    import torch
    import transformers

    from deepseek_jax.hf.config import config_to_hf

    torch.set_num_threads(threads)
    d = config_to_hf(cfg)
    d.pop("model_type", None)
    d.pop("architectures", None)
    hf_cfg = transformers.DeepseekV3Config(**{k: v for k, v in d.items() if not k.startswith("_")})
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(hf_cfg).float().train()
    try:
        model.set_experts_implementation("grouped_mm")
    except Exception:  # noqa: BLE001 - older transformers: the default
        pass
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    toks = torch.as_tensor(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq)), dtype=torch.long)

    def step():
        out = model(toks, labels=toks)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss)

    step()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t)
    sec = statistics.median(times)
    impl = getattr(model.config, "_experts_implementation", None)
    return {"step_s": sec, "tokens_per_s": batch * seq / sec, "loss": loss, "experts_implementation": impl,
            "torch_threads": threads}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="+", default=["tiny", "bench"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--remat", default="none")
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()
    import os

    peak, src = T.peak_flops()
    rows = []
    for name in args.configs:
        cfg = dsj.load_config(name, **{"mtp.depth": 0})
        info = dsj.model_info(cfg)
        fpt = T.flops_per_token(cfg, args.seq)
        row = {"config": name, "params_total": info["params_total"], "params_active": info["params_active"],
               "flops_per_token": fpt, "ours": ours(cfg, args.batch, args.seq, args.iters, args.remat)}
        row["ours"]["mfu"] = fpt * row["ours"]["tokens_per_s"] / peak
        if not args.no_torch:
            row["pytorch"] = pytorch(cfg, args.batch, args.seq, args.iters, os.cpu_count() or 1)
            row["pytorch"]["mfu"] = fpt * row["pytorch"]["tokens_per_s"] / peak
            row["speedup_vs_pytorch"] = row["ours"]["tokens_per_s"] / row["pytorch"]["tokens_per_s"]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    print(json.dumps({"benchmark": "train_step", "batch": args.batch, "seq": args.seq, "remat": args.remat,
                      "peak_flops": peak, "peak_source": src, "results": rows, **provenance()}, indent=1))


if __name__ == "__main__":
    main()
