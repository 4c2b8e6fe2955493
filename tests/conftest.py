"""Shared fixtures. Fakes 8 CPU devices before JAX is imported, and enables float32 matmuls at full precision."""

import gc
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _session_compilation_cache() -> str:
    """One persistent JAX compilation cache per test session, shared by the xdist workers and by every
    subprocess they start (training runs, notebooks, multi-process tests inherit the environment): the
    same train step compiled in ten processes is compiled once. Fresh per session, so nothing carries
    over between runs."""
    import tempfile

    uid = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if uid is None:
        return tempfile.mkdtemp(prefix="dsj-jax-cache-")
    path = os.path.join(tempfile.gettempdir(), f"dsj-jax-cache-{uid}")
    os.makedirs(path, exist_ok=True)
    return path


os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _session_compilation_cache())

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


# The files that take longest, started first: the two workers take whole files in this order (pytest-xdist's
# reordering by test count is off in pyproject.toml), so the capability notebooks (32 and 21 min in a full run here)
# do not begin near the end of the run and leave one worker idle while the other finishes them.
SLOWEST_FILES = ("test_niah_capability.py", "test_r1_pipeline.py", "test_notebooks.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """After each test file, drop JAX's in-memory compiled programs. Every XLA:CPU executable kept alive holds
    its own memory mappings of JIT code: one worker process measured 4.6k mappings after test_train.py and 12.3k
    after test_train + test_moe + test_sharding (RSS 4.3 GB), so a 50-minute worker walks toward the kernel's
    limit (vm.max_map_count = 65530), where LLVM's next code allocation fails and the compiler aborts the
    process (seen twice, SIGABRT inside backend_compile_and_load ~50 min in). Cleared per file: 660 mappings,
    RSS 3.1 GB, and the three files ran 10% faster; the session's persistent cache makes recompiles cheap."""
    yield
    jax.clear_caches()
    gc.collect()

# A one-layer MLA model on a 32-entry vocabulary (the addition task's characters fit): the post-training tests'
# model section, to which a test appends its own train:/grpo:/eval: sections.
TINY_CHAR_MODEL = """
vocab_size: 32
d_model: 32
n_layers: 1
intermediate_size: 64
max_position_embeddings: 64
attention: {kind: mla, n_heads: 2, q_lora_rank: 16, kv_lora_rank: 16, qk_nope_head_dim: 8, qk_rope_head_dim: 8,
            v_head_dim: 8}
"""


@pytest.fixture
def tiny_char_model(tmp_path):
    """``write(extra_yaml="") -> path``: the tiny character-vocabulary model (plus ``extra_yaml``) as a preset."""

    def write(extra: str = "", name: str = "model.yaml"):
        path = tmp_path / name
        path.write_text(TINY_CHAR_MODEL + extra)
        return path

    return write


@pytest.fixture(scope="session")
def tiny_cfg():
    import deepseek_jax as dsj

    return dsj.load_config("tiny")


@pytest.fixture(scope="session")
def tiny_vars(tiny_cfg):
    import deepseek_jax as dsj

    return dsj.init_variables(tiny_cfg, 0)


@pytest.fixture(scope="session")
def jit_apply():
    """``jit_apply(cfg)(variables, tokens, positions=None, segment_ids=None) -> ModelOutput``, compiled once per cfg."""
    import functools

    import deepseek_jax as dsj

    @functools.lru_cache(maxsize=None)
    def make(cfg):
        return jax.jit(lambda v, t, positions=None, segment_ids=None:
                       dsj.Transformer(cfg).apply(v, t, positions=positions, segment_ids=segment_ids))

    return make


TINY_RUN = ["train.steps=300", "train.batch_size=4", "train.seq_len=128", "train.eval_every=300",
            "train.eval_batches=2", "train.checkpoint_every=300", "train.sample_tokens=0"]


def train_single_device(out, overrides):
    """``deepseek-jax train --config tiny`` in a subprocess on ONE CPU device (this test process fakes 8,
    which would partition a small run for nothing); returns the run summary (``--json``)."""
    import json
    import subprocess
    import sys

    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "xla_force_host_platform_device_count" not in f)
    cmd = [sys.executable, "-m", "deepseek_jax.cli", "train", "--config", "tiny", "--out", str(out),
           "--no-progress", "--json", *overrides]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout[r.stdout.index("{"):])


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, worker_id):
    """The tiny preset trained once for the session (300 steps of 4 x 128 tokens on the default corpus,
    float32, one device): ``(run folder, summary)``. The FP8 test compares against it; the generation
    tests decode with it. Under pytest-xdist the workers share one run (the first trains it under a file
    lock in the session's temporary folder, the others read its summary)."""
    import json

    from filelock import FileLock

    if worker_id == "master":
        out = tmp_path_factory.mktemp("tiny_run") / "run"
        return out, train_single_device(out, TINY_RUN)
    shared = tmp_path_factory.getbasetemp().parent / "tiny_run"  # this session's folder, above every worker's
    shared.mkdir(exist_ok=True)
    out, done = shared / "run", shared / "summary.json"
    with FileLock(str(shared / ".lock")):
        if not done.exists():
            done.write_text(json.dumps(train_single_device(out, TINY_RUN)))
    return out, json.loads(done.read_text())
