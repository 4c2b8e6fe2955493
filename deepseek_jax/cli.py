"""``deepseek-jax`` command line: ``info`` (parameter counts, KV-cache sizes, and with ``--mesh`` a layout report)."""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main"]


def _fake_cpu_devices(n: int) -> None:
    """On a CPU-only machine, expose ``n`` devices (must run before JAX initialises its backend)."""
    import os

    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def _info(args: argparse.Namespace) -> int:
    if args.mesh:
        import math

        from deepseek_jax.sharding import parse_mesh

        _fake_cpu_devices(math.prod(parse_mesh(args.mesh).values()))
    from deepseek_jax.config import ModelConfig, load_config
    from deepseek_jax.info import model_info

    cfg = load_config(args.config) if args.config else ModelConfig.from_hf(args.hf)
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
            ("KV cache per token per layer (bf16)", f"{info['kv_cache_bytes_per_token_per_layer']:,} B"),
            ("KV cache per token, all layers (bf16)", f"{info['kv_cache_bytes_per_token']:,} B"),
            ("eval_shape time", f"{info['eval_shape_seconds']} s")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    return 0


def _layout(cfg, args: argparse.Namespace) -> int:
    import jax

    from deepseek_jax.layout import format_report, layout_report
    from deepseek_jax.sharding import make_mesh, parse_mesh

    axes = parse_mesh(args.mesh)
    devices = jax.devices()
    n = 1
    for v in axes.values():
        n *= v
    mesh = make_mesh(axes, devices[:n] if jax.default_backend() == "cpu" else devices)
    report = layout_report(cfg, mesh, batch=args.batch, seq=args.seq, step=not args.no_step)
    if args.json:
        print(json.dumps(report, indent=1, default=str))
    else:
        print(format_report(report))
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
    p.add_argument("--batch", type=int, default=8, help="global batch of the step analysed with --mesh")
    p.add_argument("--seq", type=int, default=128, help="sequence length of the step analysed with --mesh")
    p.add_argument("--no-step", action="store_true", help="with --mesh: skip compiling the step")
    p.set_defaults(fn=_info)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"deepseek-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
