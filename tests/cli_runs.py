"""``python -m train`` runs in this process or several one after another in one subprocess, so
imports and compiled programs are paid for once; each run's exit status, output and
``metrics.jsonl`` as it left them."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent

# Compile faster for the suite's tiny programs, whose compiling is most of a test's time: XLA:CPU's
# older fusion emitters take about 60% of the time of its MLIR fusion emitters (``pytest -m "not
# slow"`` on 2 cores: 7 min 9 s -> 4 min 48 s, the same tests passing); Eigen dots instead of XNNPACK
# and one code-generation thread (the suite already keeps both cores busy) save about 10% more.
# Set for every test process and child process; users' runs keep XLA's defaults.
COMPILE_FLAGS = (
    "--xla_cpu_use_fusion_emitters=false --xla_cpu_use_xnnpack=false --xla_cpu_parallel_codegen_split_count=1"
)


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test process on ``devices`` fake CPU devices."""
    return f"--xla_force_host_platform_device_count={devices} {COMPILE_FLAGS}"


def child_env(devices: int) -> dict[str, str]:
    """This process's environment for a child process on ``devices`` fake CPU devices, CPU only,
    with the repository importable."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "XLA_FLAGS": xla_flags(devices), "JAX_PLATFORMS": "cpu", "PYTHONPATH": path}


DRIVER = """
import contextlib, json, pathlib, sys
from train.__main__ import main
for run in json.loads(sys.argv[1]):
    with open(run["log"] + ".out", "w") as out, open(run["log"] + ".err", "w") as err:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = main(run["argv"])
    metrics = pathlib.Path(run["dir"]) / "metrics.jsonl"
    pathlib.Path(run["log"] + ".metrics").write_text(metrics.read_text() if metrics.exists() else "")
    pathlib.Path(run["log"] + ".rc").write_text(str(status))
"""


@dataclasses.dataclass
class Run:
    dir: pathlib.Path
    rc: int
    out: str
    err: str
    metrics: list[dict]  # metrics.jsonl as this run left it

    def losses(self) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in self.metrics if "loss" in r}

    def evals(self) -> list[dict]:
        return [r for r in self.metrics if "eval_loss" in r]


def run_dir(argv: list[str]) -> pathlib.Path:
    """The ``run.dir=`` an argv trains in (the last one given)."""
    return pathlib.Path([a for a in argv if a.startswith("run.dir=")][-1].split("=", 1)[1])


def read_jsonl(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def in_this_process(argv: list[str], callbacks: tuple = ()) -> Run:
    """Runs ``train.__main__.main(argv, callbacks)`` here (from the repository root, with this
    process's devices: 8 fake CPU devices under tests/conftest.py)."""
    from train.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(REPO), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(argv, callbacks)
    directory = run_dir(argv)
    return Run(directory, status, out.getvalue(), err.getvalue(), read_jsonl(directory / "metrics.jsonl"))


def in_one_process(argvs: list[list[str]], logs: pathlib.Path, env: dict, timeout: float = 900) -> list[Run]:
    """Runs each argv with ``train.__main__.main`` in turn in one fresh process; logs go under ``logs``."""
    names = [logs / f"run-{time.monotonic_ns()}-{i}" for i in range(len(argvs))]
    spec = [{"argv": argv, "log": str(name), "dir": str(run_dir(argv))} for argv, name in zip(argvs, names)]
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(spec)],
        check=False,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    runs = []
    for argv, name in zip(argvs, names):
        text = {}
        for suffix in (".rc", ".out", ".err", ".metrics"):
            path = pathlib.Path(f"{name}{suffix}")
            assert path.exists(), f"the driver died before finishing {argv}:\n{done.stderr[-3000:]}"
            text[suffix] = path.read_text()
        metrics = [json.loads(line) for line in text[".metrics"].splitlines()]
        runs.append(Run(run_dir(argv), int(text[".rc"]), text[".out"], text[".err"], metrics))
    return runs
