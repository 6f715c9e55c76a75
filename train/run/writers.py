"""Where metrics go: the trackers of ``run.trackers`` and a loss-curve PNG at the end.

``jsonl``: ``run.dir/metrics.jsonl``; ``tensorboard``: ``run.dir/tensorboard``; ``wandb``: Weights &
Biases (``WANDB_MODE=offline`` needs no network), its run id kept in ``run.dir/wandb_id`` so a resumed
run continues the same W&B run; ``mlflow``: an MLflow run in ``$MLFLOW_TRACKING_URI`` or else the local
store ``run.dir/mlflow.db`` (SQLite: MLflow 3 refuses its ``file:`` store unless
``MLFLOW_ALLOW_FILE_STORE=true``) with artifacts in ``run.dir/mlartifacts``, its id kept in
``run.dir/mlflow_run_id``. Each gets every record's
numbers as scalars at its step; wandb and mlflow also get the config as run parameters and, at the
end, ``loss.png`` and the eval records as a table. A tracker that fails says so in one ``warning:``
line and is dropped; the run goes on.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time
import uuid


def _scalars(record: dict) -> dict[str, float]:
    return {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _flat(tree: dict, prefix: str = "") -> dict[str, str]:
    """{'train': {'steps': 3}} -> {'train.steps': '3'}: the config as run parameters."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, list) else str(value)
    return out


class Jsonl:
    """One JSON object per record in ``metrics.jsonl``; on resume from step k, the records after k
    (from the interrupted attempt) are dropped first, so the file reads as one uninterrupted run."""

    def __init__(self, run_dir: pathlib.Path, resume_step: int, config: dict):
        path = run_dir / "metrics.jsonl"
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))
        self.file = path.open("a")

    def log(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def finish(self, plot: pathlib.Path | None, evals: list[dict]) -> None:
        self.file.close()


class TensorBoard:
    def __init__(self, run_dir: pathlib.Path, resume_step: int, config: dict):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, record: dict) -> None:
        for key, value in _scalars(record).items():
            self.writer.add_scalar(key, value, record["step"])

    def finish(self, plot: pathlib.Path | None, evals: list[dict]) -> None:
        self.writer.close()


class Wandb:
    def __init__(self, run_dir: pathlib.Path, resume_step: int, config: dict):
        import wandb

        id_file = run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "meshlm"), name=run_dir.name, id=run_id, resume="allow",
            dir=str(run_dir), config=config,
        )  # fmt: skip
        id_file.write_text(run_id + "\n")

    def log(self, record: dict) -> None:
        self.run.log(_scalars(record), step=record["step"])

    def finish(self, plot: pathlib.Path | None, evals: list[dict]) -> None:
        import wandb

        try:
            if plot is not None:
                self.run.log({"loss_plot": wandb.Image(str(plot))})
            if evals:
                columns = sorted({k for record in evals for k in record}, key=lambda k: (k != "step", k))
                self.run.log({"evals": wandb.Table(columns=columns, data=[[r.get(k) for k in columns] for r in evals])})
        finally:
            self.run.finish()


class Mlflow:
    def __init__(self, run_dir: pathlib.Path, resume_step: int, config: dict):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        local = os.environ.get("MLFLOW_TRACKING_URI") is None
        uri = f"sqlite:///{(run_dir / 'mlflow.db').absolute()}" if local else os.environ["MLFLOW_TRACKING_URI"]
        self.client = MlflowClient(tracking_uri=uri)
        id_file = run_dir / "mlflow_run_id"
        if id_file.exists():
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "meshlm")
            experiment = self.client.get_experiment_by_name(name)
            artifacts = (run_dir / "mlartifacts").absolute().as_uri() if local else None
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name, artifacts)
            self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
            params = [Param(k, v[:6000]) for k, v in _flat(config).items()]
            for start in range(0, len(params), 100):  # log_batch takes at most 100 parameters
                self.client.log_batch(self.run_id, params=params[start : start + 100])
            id_file.write_text(self.run_id + "\n")

    def log(self, record: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, record["step"]) for k, v in _scalars(record).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, plot: pathlib.Path | None, evals: list[dict]) -> None:
        if plot is not None:
            self.client.log_artifact(self.run_id, str(plot))
        if evals:
            columns = sorted({k for record in evals for k in record}, key=lambda k: (k != "step", k))
            self.client.log_table(self.run_id, {k: [r.get(k) for r in evals] for k in columns}, "evals.json")
        self.client.set_terminated(self.run_id)


TRACKERS = {"jsonl": Jsonl, "tensorboard": TensorBoard, "wandb": Wandb, "mlflow": Mlflow}
EXTRAS = {"wandb": "wandb", "mlflow": "mlflow"}  # pip install -e '.[EXTRA]'


class MetricsWriter:
    """Sends every record to the trackers named (main process only: ``enabled``)."""

    def __init__(
        self,
        run_dir: pathlib.Path,
        resume_step: int,
        enabled: bool = True,
        trackers: tuple[str, ...] = ("tensorboard", "jsonl"),
        config: dict | None = None,
    ):
        self.run_dir, self.trackers, self.evals = pathlib.Path(run_dir), {}, []
        if not enabled:
            return
        for name in trackers:
            try:
                self.trackers[name] = TRACKERS[name](self.run_dir, resume_step, config or {})
            except Exception as e:  # noqa: BLE001 - a tracker never stops the run
                fix = f"; pip install -e '.[{EXTRAS[name]}]'" if isinstance(e, ImportError) and name in EXTRAS else ""
                self._drop(name, e, fix)

    def _drop(self, name: str, error: Exception, fix: str = "") -> None:
        self.trackers.pop(name, None)
        reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200] if str(error).strip() else ''}"
        print(
            f"warning: tracker {name} failed ({reason}){fix}; the run goes on without it", file=sys.stderr, flush=True
        )

    def _each(self, method: str, *args) -> None:
        for name, tracker in list(self.trackers.items()):
            try:
                getattr(tracker, method)(*args)
            except Exception as e:  # noqa: BLE001 - a tracker never stops the run
                self._drop(name, e)

    def write(self, record: dict) -> None:
        if any(k.startswith("eval_") for k in record):
            self.evals.append(record)
        self._each("log", record)

    def close(self) -> None:
        plot = self.run_dir / "loss.png"
        self._each("finish", plot if plot.exists() else None, self.evals)
        self.trackers = {}


def read_metrics(run_dir: pathlib.Path) -> list[dict]:
    path = pathlib.Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def plot_losses(run_dir: pathlib.Path) -> pathlib.Path:
    """Writes ``loss.png``: train loss and eval loss against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    out = pathlib.Path(run_dir) / "loss.png"
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out
