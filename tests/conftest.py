"""Every test process sees 8 fake CPU devices and only the CPU backend: XLA reads the flag when jax
first initialises, and an installed libtpu (the TPU plan tests) must not probe for a TPU.

The tests start many small runs of the same tiny models, in this process and in subprocesses
(which inherit the environment): one persistent compilation cache for the session lets each
program compile once. The programs are tiny and run a few steps, so compiling them is most of a
test's time: XLA skips its expensive LLVM passes (about 30% less CPU time per file; the same losses
to the bit on the tiny runs). An environment variable, not XLA_FLAGS, so that subprocesses which set
their own XLA_FLAGS (a device count) still inherit it; those take theirs from
``cli_runs.child_env``, which keeps the suite's compile flags (``cli_runs.COMPILE_FLAGS``).
"""

import os
import tempfile

import pytest
from cli_runs import xla_flags

os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # xdist workers inherit the controller's
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="meshlm-test-jax-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# The files that take longest (their module fixtures train tiny runs), longest first. Under
# ``-n 2 --dist loadscope`` (pyproject.toml) a file runs whole on one worker, in collection order:
# starting with these lets the many short files fill in behind them instead of one long file
# finishing alone at the end.
LONGEST_FIRST = (
    "test_evaluate.py",
    "test_hf_families.py",
    "test_finetune.py",
    "test_tune.py",
    "test_sources.py",
    "test_lora.py",
    "test_prune.py",
    "test_peft_methods.py",
    "test_resume.py",
    "test_packing_data.py",
    "test_adversarial.py",
    "test_multihost.py",
    "test_distill.py",
    "test_dropout.py",
    "test_train_step.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: same order within a file
