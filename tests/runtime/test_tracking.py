"""Experiment tracking: a tiny CPU run writes TensorBoard events, an offline W&B run and MLflow metrics, each
read back with its own reader; a backend asked for but missing stops the run at once with one sentence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubeforge.runtime import export, tracking
from kubeforge.runtime.contract import ENV_TRACKING, EXIT_USER_ERROR
from kubeforge.runtime.entry import UserError
from tests.runtime.conftest import make_contract
from tests.runtime.test_train import run_inline

STEPS = 5
TRACKING_ENV = (ENV_TRACKING, "WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "MLFLOW_TRACKING_URI",
                "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE")  # fmt: skip


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in TRACKING_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def tracked_run(tiny_model, task_data, tmp_path_factory):
    """One run logging to all three backends (W&B offline, MLflow in a file store)."""
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    tmp = tmp_path_factory.mktemp("tracked")
    out = tmp / "out"
    env = {
        ENV_TRACKING: "tensorboard,wandb,mlflow",
        "WANDB_MODE": "offline",
        "WANDB_PROJECT": "kf-test",
        "MLFLOW_TRACKING_URI": (tmp / "mlruns").as_uri(),
        "MLFLOW_EXPERIMENT_NAME": "kf-test",
        "MLFLOW_ALLOW_FILE_STORE": "true",
    }  # fmt: skip  (mlflow-skinny has no SQL store; servers are http://)
    with pytest.MonkeyPatch.context() as mp:
        for name in TRACKING_ENV:
            mp.delenv(name, raising=False)
        for name, value in env.items():
            mp.setenv(name, value)
        contract = make_contract(tiny_model, task_data[0], out, steps=STEPS, micro=4, accumulation=1)
        code, summary = run_inline(contract, tmp)
    assert code == 0, summary
    losses = json.loads((out / export.MANIFEST).read_text())["losses"]
    return out, losses, env


def test_tensorboard_events_beside_the_checkpoints_hold_the_losses(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, losses, _ = tracked_run
    events = EventAccumulator(str(out / tracking.TENSORBOARD_DIR)).Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, STEPS + 1))
    assert [e.value for e in loss] == pytest.approx(losses, abs=1e-5)
    tags = set(events.Tags()["scalars"])
    assert {"train/learning_rate", "train/tokens_per_second", "train/epoch"} <= tags
    assert "train/mfu" not in tags  # a CPU: no peak, no MFU
    rates = [e.value for e in events.Scalars("train/learning_rate")]
    assert rates[0] > 0 and rates == sorted(rates, reverse=True)  # cosine, no warm-up in 5 steps
    assert "config" in str(events.Tags()["tensors"])  # the run config, once, as text
    assert any(f["path"].startswith("tensorboard/") for f in json.loads((out / export.MANIFEST).read_text())["files"])
    assert export.verify(out) == []  # closed before the manifest was written


def test_wandb_offline_writes_its_run_files(tracked_run):
    """Beside the checkpoints, ready for `wandb sync`; wandb 0.31 has no Python reader of its record file, so
    the records are looked for in it (protobuf keeps strings as they are)."""
    out, _, _ = tracked_run
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((out / "wandb").iterdir())
    (records,) = runs[0].glob("run-*.wandb")
    data = records.read_bytes()
    for key in (b"train/loss", b"train/learning_rate", b"train/tokens_per_second", b"global_batch_size"):
        assert key in data, key


def test_mlflow_records_the_metrics_and_the_run_config(tracked_run):
    from mlflow.tracking import MlflowClient

    _, losses, env = tracked_run
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("kf-test")
    (run,) = client.search_runs([experiment.experiment_id])
    history = sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(1, STEPS + 1))
    assert [m.value for m in history] == pytest.approx(losses, abs=1e-5)
    assert run.data.params["training.method"] == "lora"
    assert float(run.data.params["training.learning_rate"]) == pytest.approx(3e-3)
    assert run.info.status == "FINISHED" and run.info.run_name == "test"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, ("tensorboard",)),
        ({"WANDB_API_KEY": "k"}, ("tensorboard", "wandb")),
        ({"WANDB_MODE": "offline", "MLFLOW_TRACKING_URI": "http://mlflow:5000"}, ("tensorboard", "wandb", "mlflow")),
        ({ENV_TRACKING: "mlflow", "WANDB_API_KEY": "k"}, ("mlflow",)),
        ({ENV_TRACKING: "tensorboard, wandb"}, ("tensorboard", "wandb")),
        ({ENV_TRACKING: "none", "WANDB_API_KEY": "k"}, ()),
    ],
)
def test_which_backends_run(env, expected):
    assert tracking.chosen(env) == expected


def test_an_unknown_backend_is_a_user_error():
    with pytest.raises(UserError, match="unknown tracking backend 'tensorbord'"):
        tracking.chosen({ENV_TRACKING: "tensorbord"})


def test_a_configured_backend_without_its_settings_is_a_user_error(tiny_model, task_data, tmp_path):
    contract = make_contract(tiny_model, task_data[0], tmp_path / "out")
    with pytest.raises(UserError, match="tracking mlflow: needs MLFLOW_TRACKING_URI"):
        tracking.check({ENV_TRACKING: "mlflow"})
    with pytest.raises(UserError, match="tracking wandb: needs WANDB_API_KEY"):
        tracking.start(contract, main=True, env={ENV_TRACKING: "wandb"})
    assert tracking.check({ENV_TRACKING: "wandb", "WANDB_MODE": "offline"}) == ("wandb",)


def test_a_missing_package_fails_the_run_at_once_with_one_sentence(tiny_model, task_data, tmp_path, monkeypatch,
                                                                   capsys):  # fmt: skip
    real = tracking._installed
    monkeypatch.setattr(tracking, "_installed", lambda module: module != "wandb" and real(module))
    monkeypatch.setenv("WANDB_API_KEY", "not-used")
    out = tmp_path / "out"
    code, summary = run_inline(make_contract(tiny_model, task_data[0], out, steps=2), tmp_path)
    assert code == EXIT_USER_ERROR
    assert summary == {"status": "failed",
                       "error": "tracking wandb: the wandb package is not installed in the trainer image"}  # fmt: skip
    printed = capsys.readouterr()
    assert "Traceback" not in printed.out + printed.err
    assert not out.exists()  # before any data or model was read


def test_the_default_tensorboard_is_skipped_quietly_where_it_is_not_installed(tiny_model, task_data, tmp_path,
                                                                               monkeypatch):  # fmt: skip
    monkeypatch.setattr(tracking, "_installed", lambda module: False)
    contract = make_contract(tiny_model, task_data[0], tmp_path / "out")
    sink = tracking.start(contract, main=True, env={})
    sink.log(1, {"loss": 1.0})
    sink.close()
    assert not (tmp_path / "out" / tracking.TENSORBOARD_DIR).exists()


def test_only_rank_0_tracks(tiny_model, task_data, tmp_path):
    contract = make_contract(tiny_model, task_data[0], tmp_path / "out")
    sink = tracking.start(contract, main=False, env={})
    sink.log(1, {"loss": 1.0})
    sink.close()
    assert not Path(tmp_path / "out").exists()


def test_a_backend_failing_mid_run_is_dropped_and_training_goes_on(tiny_model, task_data, tmp_path, caplog):
    contract = make_contract(tiny_model, task_data[0], tmp_path / "out")
    sink = tracking.start(contract, main=True, env={})

    class Broken:
        calls = 0

        def log(self, step, scalars):
            Broken.calls += 1
            raise ConnectionError("tracking server gone")

        def close(self):
            pass

    sink.log(1, {"loss": 2.0})
    sink.open.append(Broken())
    sink.log(2, {"loss": 1.5})
    sink.log(3, {"loss": 1.0})
    sink.close()
    assert Broken.calls == 1
    assert [r.getMessage() for r in caplog.records if "tracking server gone" in r.getMessage()] == [
        "tracking: Broken failed, it stops logging: ConnectionError: tracking server gone"
    ]
    assert [e.value for e in _events(tmp_path / "out").Scalars("train/loss")] == [2.0, 1.5, 1.0]


def test_a_resumed_run_hides_the_steps_it_repeats(tiny_model, task_data, tmp_path):
    contract = make_contract(tiny_model, task_data[0], tmp_path / "out")
    first = tracking.start(contract, main=True, env={})
    for step in (1, 2, 3, 4):  # checkpoint at 2, killed after 4
        first.log(step, {"loss": 10.0 + step})
    first.close()
    again = tracking.start(contract, main=True, first_step=2, env={})
    for step in (3, 4, 5):
        again.log(step, {"loss": float(step)})
    again.close()
    loss = _events(tmp_path / "out").Scalars("train/loss")
    assert [(e.step, e.value) for e in loss] == [(1, 11.0), (2, 12.0), (3, 3.0), (4, 4.0), (5, 5.0)]


def _events(out: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return EventAccumulator(str(out / tracking.TENSORBOARD_DIR)).Reload()
