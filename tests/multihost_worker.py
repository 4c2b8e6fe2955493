"""One process of the 2-process x 4-CPU-device test (run by tests/test_multihost.py, not by pytest).

Usage: python multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR
Builds the global batch from process-local rows, runs the sharded forward and gradient on a
data=2 x expert=2 x tensor=2 mesh spanning both processes, and process 0 writes the results.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_default_matmul_precision", "highest")


def main() -> None:
    pid, nproc, port, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=nproc, process_id=pid)
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec as P

    import deepseek_jax as dsj
    from deepseek_jax import sharding as S
    from deepseek_jax.train.objectives import cross_entropy

    assert jax.process_count() == nproc and len(jax.devices()) == 4 * nproc and len(jax.local_devices()) == 4
    cfg = dsj.load_config("tiny")
    mesh = S.make_mesh(dict(data=2, expert=2, tensor=2))
    variables = S.init_sharded(cfg, mesh, 0)
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (8, 16)).astype(np.int32)
    sharding = NamedSharding(mesh, P(S.BATCH_AXES, None))
    rows = sorted({i for idx in sharding.addressable_devices_indices_map(tokens.shape).values()
                   for i in range(*idx[0].indices(tokens.shape[0]))})
    local = jax.make_array_from_process_local_data(sharding, tokens[rows], tokens.shape)

    def loss(v, t):
        return cross_entropy(dsj.Transformer(cfg).apply(v, t).logits[:, :-1], t[:, 1:])[0]

    logits = dsj.forward(cfg, variables, local, mesh=mesh)
    with jax.set_mesh(mesh):
        value, grads = jax.jit(jax.value_and_grad(loss))(variables, local)
    logits, value, grads = multihost_utils.process_allgather((logits, value, grads), tiled=True)
    if pid == 0:
        flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(grads)}
        np.savez(os.path.join(out, "result.npz"), logits=np.asarray(logits), loss=np.asarray(value),
                 rows0=np.asarray(rows), **{"grad" + k: v for k, v in flat.items()})
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
