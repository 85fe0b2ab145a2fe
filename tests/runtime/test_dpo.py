"""DPO in the runtime: TRL 1.16 is the oracle for the losses, the metrics and the log-probs; preference data
fails fast; a run's chosen-over-rejected margin grows, resumes on the reference it started with, and the
sharded engines (FSDP2, ZeRO-3, LoRA) agree with one process."""

from __future__ import annotations

import json
import random
import re
import types
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import yaml

from kubeforge.runtime import dpo, engines, export, objectives, preference, progress
from kubeforge.runtime.contract import DPOConfig, ParallelConfig
from kubeforge.runtime.data import IGNORE, DataError
from kubeforge.runtime.demo import task
from kubeforge.runtime.entry import UserError
from tests.runtime.conftest import make_contract
from tests.runtime.test_train import losses, run_inline, run_torchrun

LOSS_TYPES = ["sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "apo_zero", "apo_down", "sppo_hard"]


# ---------------------------------------------------------------------------------------------- TRL as the oracle


def trl_loss_and_metrics(
    per_token: torch.Tensor,
    completion: torch.Tensor,
    ref_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: str,
    label_smoothing: float,
) -> tuple[float, dict[str, float]]:
    """TRL's own DPOTrainer._compute_loss on the batch (precomputed reference log-probs), with the model's fused
    LM head answered by ``per_token`` (the per-token log-probs TRL's head would return for these labels)."""
    DPOTrainer = pytest.importorskip("trl.trainer.dpo_trainer", reason="TRL is the oracle (the test extra)").DPOTrainer

    rows, width = completion.shape
    zeros = torch.zeros(rows, width - 1)
    trainer = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        accelerator=types.SimpleNamespace(
            device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x
        ),
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        ld_alpha=None,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )

    def model(**kwargs):
        assert kwargs["fused_lm_head"] is True
        return types.SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    inputs = {
        "input_ids": torch.zeros(rows, width, dtype=torch.long),
        "attention_mask": torch.ones(rows, width, dtype=torch.long),
        "completion_mask": completion,
        "ref_chosen_logps": ref_logps[: rows // 2],
        "ref_rejected_logps": ref_logps[rows // 2 :],
    }
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    logged = trainer._metrics["train"]
    return float(loss), {name: logged[name][-1] for name in dpo.METRICS}


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_and_metric_equals_trl(loss_type):
    from trl.trainer.utils import selective_log_softmax

    gen = torch.Generator().manual_seed(LOSS_TYPES.index(loss_type))
    pairs, width, vocab = 6, 12, 40
    logits = torch.randn(2 * pairs, width, vocab, generator=gen) * 2
    input_ids = torch.randint(0, vocab, (2 * pairs, width), generator=gen)
    prompt = torch.randint(2, 6, (2 * pairs, 1), generator=gen)  # prompt lengths
    length = prompt + torch.randint(1, width - 6, (2 * pairs, 1), generator=gen)  # then the response, then padding
    position = torch.arange(width).unsqueeze(0)
    completion = ((position >= prompt) & (position < length)).long()
    labels = input_ids.masked_fill(completion == 0, IGNORE)
    ref_logps = -torch.rand(2 * pairs, generator=gen) * 20 - 5
    beta, smoothing = 0.25, (0.1 if loss_type in dpo.SMOOTHED else 0.0)

    per_token = selective_log_softmax(logits[:, :-1], labels[:, 1:].clamp(min=0)) * completion[:, 1:]
    expected_loss, expected = trl_loss_and_metrics(
        per_token, completion, ref_logps, beta=beta, loss_type=loss_type, label_smoothing=smoothing
    )

    logps, tokens = dpo.sequence_logps(logits, labels)
    assert logps == pytest.approx(per_token.sum(dim=1), abs=1e-4)
    loss, metrics = objectives.DPO(beta, loss_type, smoothing).from_logps(logps, tokens, ref_logps)
    assert float(loss) == pytest.approx(expected_loss, abs=1e-4)
    assert metrics == pytest.approx(expected, abs=1e-4)
    assert 0 < metrics["rewards/accuracies"] < 1  # the batch has pairs either way round


def test_sequence_logps_of_a_tiny_model_equal_trls(tiny_model, tmp_path):
    """The policy's per-response log-probs (our forward: logits, shift, gather) against TRL's fused LM head."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.trainer.utils import add_fused_lm_head

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    pairs = preference.read_pairs(write_preferences(tmp_path / "pref.jsonl", n=5), tokenizer, 64)
    batch = preference.collate(pairs, tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    with torch.no_grad():
        ours, tokens = dpo.sequence_logps(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]
        )
        add_fused_lm_head(model)
        theirs = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            fused_lm_head=True,
        ).log_probs.sum(dim=1)
    assert ours == pytest.approx(theirs, abs=1e-4)
    assert tokens.tolist() == [
        sum(1 for x in row.labels if x != IGNORE) for row in [p.chosen for p in pairs] + [p.rejected for p in pairs]
    ]


# ---------------------------------------------------------------------------------------------- preference data


def write_preferences(path: Path, *, n: int | None = None, seed: int = 0) -> Path:
    """The demo's fruits as preferences: a colour is preferred over naming a fruit, half the lines in TRL's
    conversational format, half in the standard one."""
    rng = random.Random(seed)
    lines = []
    for fruit, colour in task.FACTS.items():
        for phrase in task.TRAIN_PHRASES:
            question, wrong = phrase.format(f=fruit), rng.choice(sorted(task.FACTS))
            if rng.random() < 0.5:
                lines.append(
                    {
                        "prompt": [{"role": "user", "content": question}],
                        "chosen": [{"role": "assistant", "content": colour}],
                        "rejected": [{"role": "assistant", "content": wrong}],
                    }
                )
            else:
                lines.append({"prompt": f"user : {question} </s> assistant :", "chosen": colour, "rejected": wrong})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines[:n]))
    return path


def test_standard_and_conversational_pairs_are_laid_out_like_sft_examples(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    path = tmp_path / "pref.jsonl"
    path.write_text(
        json.dumps({"prompt": "what colour is a lime ?", "chosen": "green", "rejected": "red"})
        + "\n\n"
        + json.dumps(
            {
                "prompt": [{"role": "system", "content": "colour"}, {"role": "user", "content": "lime colour ?"}],
                "chosen": [{"role": "assistant", "content": "green"}],
                "rejected": "red",
            }
        )
        + "\n"
    )
    standard, chat = preference.read_pairs(path, tokenizer, 64)

    def tokens(ids):
        return tokenizer.convert_ids_to_tokens(ids)

    assert tokens(standard.chosen.input_ids) == ["<s>", "what", "colour", "is", "a", "lime", "?", "green", "</s>"]
    assert standard.chosen.labels == [IGNORE] * 7 + standard.chosen.input_ids[7:]
    assert tokens(standard.rejected.input_ids)[7:] == ["red", "</s>"]
    # the chat template's turn ends with </s> by itself (TRL's way: no second EOS); a string response gets one
    assert tokens(chat.chosen.input_ids) == [
        "<s>",
        "system",
        ":",
        "colour",
        "</s>",
        "user",
        ":",
        "lime",
        "colour",
        "?",
        "</s>",
        "assistant",
        ":",
        "green",
        "</s>",
    ]
    assert tokens(chat.rejected.input_ids)[-2:] == ["red", "</s>"]
    assert [x for x in chat.chosen.labels if x != IGNORE] == chat.chosen.input_ids[-2:]
    assert (standard.index, chat.index) == (0, 1)
    batch = preference.collate([standard, chat], tokenizer.pad_token_id, torch.tensor([[-1.0, -2.0], [-3.0, -4.0]]))
    assert batch["input_ids"].shape == (4, 15) and batch["attention_mask"].sum(dim=1).tolist() == [9, 15, 9, 15]
    assert batch["ref_logps"].tolist() == [-1.0, -3.0, -2.0, -4.0]  # chosen rows first, then rejected
    assert objectives.tokens(batch) == 48  # both rows of every pair, padding left out


BAD = [
    (
        '{"prompt": "q", "chosen": "a"}',
        "line 2: format preference needs fields prompt, chosen and rejected (missing rejected)",
    ),
    ("not json", "line 2: not JSON"),
    ('["prompt"]', "line 2: expected a JSON object, got list"),
    ('{"prompt": "q", "chosen": ["a"], "rejected": "b"}', "line 2: with a string prompt, chosen must be a string"),
    (
        '{"prompt": [{"role": "bot", "content": "q"}], "chosen": "a", "rejected": "b"}',
        "line 2: prompt[0] needs role system or user or assistant",
    ),
    (
        '{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}',
        "line 2: chosen[0] needs role assistant",
    ),
    ('{"prompt": [{"role": "user", "content": "q"}], "chosen": [], "rejected": "b"}', "line 2: chosen must be"),
    (
        '{"prompt": "q", "chosen": "a", "rejected": "' + "red " * 70 + '"}',
        "line 2: the rejected side is 73 tokens, more than maxSeqLength 64",
    ),
]


@pytest.mark.parametrize(("line", "message"), BAD, ids=[m[8:40] for _, m in BAD])
def test_bad_preference_lines_fail_fast_with_the_file_and_line(tiny_model, tmp_path, line, message):
    from transformers import AutoTokenizer

    path = tmp_path / "pref.jsonl"
    path.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n' + line + "\n")
    with pytest.raises(DataError, match="^" + re.escape(f"{path} {message}")):
        preference.read_pairs(path, AutoTokenizer.from_pretrained(tiny_model), 64)


def dpo_contract(model, train, out, *, loss_type="sigmoid", smoothing=0.0, beta=0.1, **kwargs):
    contract = make_contract(model, train, out, fmt="preference", **kwargs)
    training = contract.training.model_copy(
        update={"objective": "dpo", "dpo": DPOConfig(beta=beta, loss_type=loss_type, label_smoothing=smoothing)}
    )
    return contract.model_copy(update={"training": training})


REFUSED = [
    ({"strategy": "megatron"}, "training.objective dpo: parallel.strategy megatron trains objective sft only"),
    ({"ulysses": 2}, "training.objective dpo with parallel.ulysses 2"),
    ({"objective": "sft"}, "training.objective sft with dataset.format preference"),
    ({"loss_type": "exo_pair"}, "training.dpo.labelSmoothing: loss type exo_pair needs it above 0"),
    ({"smoothing": 0.1}, "training.dpo.labelSmoothing 0.1: loss type sigmoid does not use it"),
]


@pytest.mark.parametrize(("change", "message"), REFUSED, ids=[m[:40] for _, m in REFUSED])
def test_plans_dpo_cannot_run_are_refused_naming_the_field(tiny_model, tmp_path, change, message):
    contract = dpo_contract(
        tiny_model,
        tmp_path / "p.jsonl",
        tmp_path / "out",
        loss_type=change.get("loss_type", "sigmoid"),
        smoothing=change.get("smoothing", 0.0),
        world=2,
        method="full",
    )
    if "strategy" in change or "ulysses" in change:
        parallel = ParallelConfig(
            strategy=change.get("strategy", "ddp"), gpus_per_node=2, ulysses=change.get("ulysses", 1)
        )
        contract = contract.model_copy(update={"parallel": parallel})
    if "objective" in change:
        contract = contract.model_copy(update={"training": contract.training.model_copy(update=change)})
    if change.get("strategy") == "megatron":
        contract = contract.model_copy(update={"compute": contract.compute.model_copy(update={"device": "cuda"})})
    with pytest.raises(UserError, match=message):
        engines.check(contract, cuda=True)
    engines.check(
        dpo_contract(tiny_model, tmp_path / "p.jsonl", tmp_path / "out", loss_type="robust", smoothing=0.1), cuda=False
    )


def test_progress_reports_the_metrics_only_where_the_objective_has_them():
    tracker = progress.Progress(10)
    tracker.update(1, 0.7, 100, 0.1)
    assert "metrics" not in tracker.snapshot() and "margin" not in tracker.line()
    tracker.update(2, 0.6, 100, 0.2, {"rewards/margins": 0.25, "rewards/accuracies": 0.75})
    snapshot = tracker.snapshot()
    assert snapshot["metrics"] == {"rewards/margins": 0.25, "rewards/accuracies": 0.75}
    assert {"step", "totalSteps", "loss", "epoch", "tokensPerSecond", "etaSeconds"} <= set(snapshot)
    assert "loss 0.6000 margin 0.2500 accuracy 0.75" in tracker.line()


# ---------------------------------------------------------------------------------------------- training runs


def manifest(out: Path) -> dict:
    return json.loads((out / export.MANIFEST).read_text())


def run_contract(model, data, out, **kwargs):
    """LoRA, 8 pairs a step (4 x 2 accumulation unless said), constant lr: a step's losses do not depend on the
    run's length, so a shorter run's are a prefix of a longer one's."""
    settings = {"method": "lora", "micro": 4, "accumulation": 2, "lr": 5e-3, "scheduler": "constant", **kwargs}
    return dpo_contract(model, data, out, **settings)


@pytest.fixture(scope="module")
def straight_run(tiny_model, tmp_path_factory):
    """12 steps on one process (checkpoints at 6 and 12): (data, folder, termination summary)."""
    folder = tmp_path_factory.mktemp("dpo-straight")
    data = write_preferences(folder / "pref.jsonl")
    code, summary = run_inline(run_contract(tiny_model, data, folder / "out", steps=12, every=6), folder)
    assert code == 0, summary
    return data, folder, summary


def test_dpo_margin_grows_and_a_resumed_run_keeps_its_reference(tiny_model, tmp_path, straight_run):
    data, straight_dir, summary = straight_run
    history = manifest(straight_dir / "out")["dpo"]["metrics"]
    margins = history["rewards/margins"]
    assert len(margins) == 12 and set(history) == set(dpo.METRICS)
    # step 1 runs before any update: the policy is the reference, so every reward is 0
    assert abs(margins[0]) < 1e-5 and abs(history["rewards/chosen"][0]) < 1e-5
    assert sum(margins[-3:]) / 3 > 0.1 > max(margins[:3])
    assert history["rewards/accuracies"][-1] >= 0.75
    assert history["logps/chosen"][-1] > history["logps/chosen"][0]
    assert summary["metrics"]["rewards/margins"] == margins[-1]
    assert (straight_dir / "out" / "checkpoints" / "step-00000012" / dpo.REFERENCE).is_file()
    assert export.verify(straight_dir / "out") == []

    # 6 steps, then on to 12 from the checkpoint: the same losses as the straight run, which they would not be
    # if the reference were recomputed from the trained weights of step 6
    def contract(steps):
        return run_contract(tiny_model, data, tmp_path / "out", steps=steps, every=6)

    assert run_inline(contract(6), tmp_path)[0] == 0
    (tmp_path / "out" / "checkpoints" / dpo.REFERENCE).unlink()  # the copy kept in the checkpoint is enough
    code, summary = run_inline(contract(12), tmp_path)
    assert code == 0, summary
    assert summary["metrics"]["resumed_from_step"] == 6
    assert (tmp_path / "out" / "checkpoints" / "step-00000012" / dpo.REFERENCE).is_file()  # kept on and on
    assert losses(tmp_path / "out") == pytest.approx(losses(straight_dir / "out"), abs=1e-4)
    assert manifest(tmp_path / "out")["dpo"]["metrics"]["rewards/margins"] == pytest.approx(margins, abs=1e-4)

    # without the reference anywhere, a resumed run refuses instead of recomputing it from trained weights
    for path in (tmp_path / "out" / "checkpoints").rglob(dpo.REFERENCE):
        path.unlink()
    code, summary = run_inline(contract(14), tmp_path)
    assert code == 3 and "cannot be recomputed from trained weights" in summary["error"]


@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_dpo_on_a_sharded_engine_matches_one_process(tiny_model, tmp_path, straight_run, strategy):
    """Two processes, LoRA, the reference pass split over the ranks (60 pairs: 30 each, padded to 8 forwards of 4)
    and all-gathered; the same global batch per step as the one-process run, so the same losses and margins.
    FSDP stops at step 3 and resumes: rank 0 reads the reference back from the checkpoint and broadcasts it."""
    data, straight_dir, _ = straight_run
    logs: list[str] = []
    for steps in (3, 6) if strategy == "fsdp" else (6,):
        contract = run_contract(
            tiny_model, data, tmp_path / "out", steps=steps, accumulation=1, world=2, strategy=strategy, every=3
        )
        code, _ = run_torchrun(contract, tmp_path, 2, logs)
        assert code == 0, logs[-1][-4000:]
        (tmp_path / "out" / "checkpoints" / dpo.REFERENCE).unlink()  # the checkpoint's copy must do
        assert (tmp_path / "out" / "checkpoints" / f"step-{steps:08d}" / dpo.REFERENCE).is_file()
    assert "reference log-probs of 60 pairs: computed" in logs[0]
    if strategy == "fsdp":
        assert "at step 3" in logs[1] and "reference log-probs of 60 pairs: read from" in logs[1]
    single, sharded = manifest(straight_dir / "out"), manifest(tmp_path / "out")
    assert sharded["losses"] == pytest.approx(single["losses"][:6], abs=2e-3)
    for name in dpo.METRICS:
        assert sharded["dpo"]["metrics"][name] == pytest.approx(single["dpo"]["metrics"][name][:6], abs=2e-3), name
    assert sharded["dpo"]["metrics"]["rewards/margins"][-1] > 0.05
    assert export.verify(tmp_path / "out") == []


def test_the_example_job_is_valid_and_asks_for_dpo_with_lora():
    from kubeforge.api.finetune import FineTuneJob

    example = Path(__file__).resolve().parents[2] / "examples" / "dpo" / "finetunejob-dpo.yaml"
    spec = FineTuneJob.model_validate(yaml.safe_load(example.read_text())).spec
    assert (spec.training.objective, spec.dataset.format, spec.method) == ("dpo", "preference", "lora")
