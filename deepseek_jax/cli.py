"""``deepseek-jax`` command line: ``info`` (parameter counts and KV-cache sizes)."""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main"]


def _info(args: argparse.Namespace) -> int:
    from deepseek_jax.config import ModelConfig, load_config
    from deepseek_jax.info import model_info

    cfg = load_config(args.config) if args.config else ModelConfig.from_hf(args.hf)
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
            ("KV cache per token per layer (bf16)", f"{info['kv_cache_bytes_per_token_per_layer']:,} B"),
            ("KV cache per token, all layers (bf16)", f"{info['kv_cache_bytes_per_token']:,} B"),
            ("eval_shape time", f"{info['eval_shape_seconds']} s")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deepseek-jax", description="DeepSeek models in JAX/Flax")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="parameter counts and KV-cache bytes (nothing is allocated)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="a preset name or YAML path, e.g. configs/tiny.yaml")
    src.add_argument("--hf", help="a Hugging Face checkpoint directory or config.json")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(fn=_info)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"deepseek-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
