"""Experiment tracking on rank 0: TensorBoard event files beside the checkpoints by default, Weights & Biases
and MLflow when configured.

Which backends run (``KUBEFORGE_TRACKING``, comma-separated, as a FineTuneJob's ``spec.tracking`` renders it):

    unset        tensorboard; plus wandb when WANDB_API_KEY or WANDB_MODE is set; plus mlflow when
                 MLFLOW_TRACKING_URI is set (each configured through its own environment, e.g. a Secret)
    named        exactly those; ``none`` turns tracking off

Where they write: TensorBoard into ``<output>/tensorboard`` (the folder holding ``checkpoints``: on the
output volume, and for s3:// outputs uploaded with the artifact); W&B's local files into WANDB_DIR, else
that same folder (``wandb/``: an offline run can be synced later); MLflow to MLFLOW_TRACKING_URI, in the
experiment MLFLOW_EXPERIMENT_NAME (else ``kubeforge``). A restarted gang continues the same W&B and
MLflow run (keyed by the job's uid) and TensorBoard drops the steps the restart repeats (purge_step).

Each step logs loss, learning rate, epoch, tokens/s, MFU (where known) and the objective's metrics (DPO:
TRL's ``rewards/margins``...); the run config (the contract) is logged once, when the run opens.
A backend that is asked for but not installed, or lacks its settings, is a configuration error before
any work starts (``check`` raises UserError: EXIT_USER_ERROR, one sentence); a backend failing later
(a rejected key, a tracking server gone) is logged once and dropped, never stopping the training.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from kubeforge.runtime.contract import ENV_TRACKING, Contract
from kubeforge.runtime.entry import UserError

log = logging.getLogger("kubeforge.tracking")

BACKENDS = ("tensorboard", "wandb", "mlflow")
TENSORBOARD_DIR = "tensorboard"
PREFIX = "train/"  # every scalar's name: train/loss, train/learning_rate, train/rewards/margins...


class Tracker(Protocol):
    def log(self, step: int, scalars: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


def chosen(env: Mapping[str, str]) -> tuple[str, ...]:
    """The backends the environment asks for (see the module's docstring)."""
    named = env.get(ENV_TRACKING, "").strip()
    if named:
        names = tuple(dict.fromkeys(n.strip().lower() for n in named.split(",") if n.strip()))
        unknown = [n for n in names if n not in (*BACKENDS, "none")]
        if unknown:
            raise UserError(f"{ENV_TRACKING}={named}: unknown tracking backend {unknown[0]!r}; use "
                            f"{', '.join(BACKENDS)} or none")  # fmt: skip
        return () if "none" in names else names
    auto = ["tensorboard"]
    if env.get("WANDB_API_KEY") or env.get("WANDB_MODE"):
        auto.append("wandb")
    if env.get("MLFLOW_TRACKING_URI"):
        auto.append("mlflow")
    return tuple(auto)


def check(env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The backends that will run, or UserError naming the first one asked for that cannot (every rank checks:
    the gang fails as one, before any work)."""
    env = os.environ if env is None else env
    usable = []
    for name in chosen(env):
        problem = _missing(name, env)
        if problem is None:
            usable.append(name)
        elif name == "tensorboard" and not env.get(ENV_TRACKING):  # the default, not asked for: skip it quietly
            log.info("tracking: no TensorBoard event files (%s)", problem)
        else:
            raise UserError(f"tracking {name}: {problem}")
    return tuple(usable)


def start(contract: Contract, *, main: bool, first_step: int = 0, env: Mapping[str, str] | None = None) -> Tracker:
    """Rank 0's trackers, opened now with the run config (each one that fails to open is dropped with a
    warning); other ranks get one that logs nothing. ``first_step``: the step a resumed run starts from."""
    env = os.environ if env is None else env
    names = check(env) if main else ()
    root = Path(contract.output.checkpoint_dir).parent
    opened = [_Fanout.guard(name, _OPENERS[name], contract, root, env, first_step) for name in names]
    return _Fanout([t for t in opened if t is not False])


def run_config(contract: Contract) -> dict[str, Any]:
    """The run's configuration as flat ``a.b.c`` keys (MLflow params; W&B and TensorBoard take it as is)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, sub in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), sub)
        else:
            flat[prefix] = json.dumps(value) if isinstance(value, list | dict) else value

    walk("", contract.model_dump(mode="json"))
    return flat


def _missing(name: str, env: Mapping[str, str]) -> str | None:
    """Why a backend cannot run here (one phrase), or None."""
    if name == "tensorboard":
        if not (_installed("tensorboard") or _installed("tensorboardX")):
            return "neither the tensorboard nor the tensorboardX package is installed in the trainer image"
        return None
    if name == "wandb":
        if not _installed("wandb"):
            return "the wandb package is not installed in the trainer image"
        if not (env.get("WANDB_API_KEY") or env.get("WANDB_MODE")):
            return "needs WANDB_API_KEY (a key of spec.tracking.secretRef's Secret) or WANDB_MODE=offline"
        return None
    if not _installed("mlflow"):
        return "the mlflow package (mlflow-skinny) is not installed in the trainer image"
    if not env.get("MLFLOW_TRACKING_URI"):
        return "needs MLFLOW_TRACKING_URI (a key of spec.tracking.secretRef's Secret)"
    return None


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


class _Fanout:
    """The open backends behind one Tracker, each dropped on its first failure."""

    def __init__(self, trackers: list[Tracker]):
        self.open = trackers

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        values = {PREFIX + k: float(v) for k, v in scalars.items() if v is not None}
        self.open = [t for t in self.open if self.guard(_name(t), t.log, step, values) is not False]

    def close(self) -> None:
        for tracker in self.open:
            self.guard(_name(tracker), tracker.close)
        self.open = []

    @staticmethod
    def guard(what: str, call: Any, *args: Any) -> Any:
        """``call``'s result (True for None), or False when it raised: tracking never stops the training."""
        try:
            result = call(*args)
            return True if result is None else result
        except Exception as err:
            log.warning("tracking: %s failed, it stops logging: %s: %s", what, type(err).__name__, err)
            return False


def _name(tracker: Tracker) -> str:
    return getattr(tracker, "name", type(tracker).__name__)


class _TensorBoard:
    name = "tensorboard"

    def __init__(self, contract: Contract, root: Path, env: Mapping[str, str], first_step: int):
        folder = root / TENSORBOARD_DIR
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch's writer needs the tensorboard package; tensorboardX writes the same files
            from tensorboardX import SummaryWriter
        folder.mkdir(parents=True, exist_ok=True)
        # purge_step: a resumed run's next step; TensorBoard hides what an earlier attempt logged from there on
        self.writer = SummaryWriter(str(folder), purge_step=first_step + 1 if first_step else None)
        text = json.dumps(contract.model_dump(mode="json"), indent=2, sort_keys=True)
        self.writer.add_text("config", "```json\n" + text + "\n```", global_step=first_step)

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, global_step=step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    name = "wandb"

    def __init__(self, contract: Contract, root: Path, env: Mapping[str, str], first_step: int):
        import wandb

        folder = Path(env.get("WANDB_DIR") or root)
        folder.mkdir(parents=True, exist_ok=True)
        job = contract.job
        self.run = wandb.init(
            project=env.get("WANDB_PROJECT") or "kubeforge",
            name=job.name,
            id=f"{job.name}-{job.uid}" if job.uid else None,  # a restarted gang continues the run
            resume="allow" if job.uid else None,
            dir=str(folder),
            config=contract.model_dump(mode="json"),
            tags=[job.namespace, contract.training.method, contract.parallel.strategy],
            settings=wandb.Settings(console="off", silent=True),  # the pod's own log stays as it is
        )

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        self.run.log(dict(scalars), step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    name = "mlflow"
    UID_TAG = "kubeforge.io/uid"

    def __init__(self, contract: Contract, root: Path, env: Mapping[str, str], first_step: int):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
        name = env.get("MLFLOW_EXPERIMENT_NAME") or "kubeforge"
        found = self.client.get_experiment_by_name(name)
        experiment = found.experiment_id if found else self.client.create_experiment(name)
        job = contract.job
        earlier = (
            self.client.search_runs([experiment], f"tags.`{self.UID_TAG}` = '{job.uid}'", max_results=1)
            if job.uid
            else []
        )
        if earlier:  # a restarted gang: the same run goes on (its params are logged already)
            self.run_id = earlier[0].info.run_id
            return
        tags = {"kubeforge.io/namespace": job.namespace, **({self.UID_TAG: job.uid} if job.uid else {})}
        self.run_id = self.client.create_run(experiment, run_name=job.name, tags=tags).info.run_id
        from mlflow.entities import Param

        params = [Param(k, str(v)[:6000]) for k, v in run_config(contract).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in scalars.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


_OPENERS: dict[str, Any] = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}
