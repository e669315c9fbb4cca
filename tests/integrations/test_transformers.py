"""CurveBallTrainer: a drop-in for the Hugging Face Trainer, on tiny models with random weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers", reason="the transformers test extra is missing")
pytest.importorskip("accelerate", reason="the transformers Trainer needs accelerate")

from curveball.integrations.transformers import CurveBallTrainer  # noqa: E402

VOCAB, SEQ = 16, 8


class Tokens(torch.utils.data.Dataset):
    """Random token sequences; labels are the tokens (causal LM) or a class per sequence."""

    def __init__(self, n: int = 32, classes: int | None = None) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
        self.labels = self.ids if classes is None else (self.ids[:, 0] % classes)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ, n_embd=16, n_layer=2, n_head=2,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=SEQ, num_labels=3,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config)


def arguments(tmp_path, **overrides):
    options = {
        "output_dir": str(tmp_path),
        "per_device_train_batch_size": 8,
        "max_steps": 8,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "seed": 0,
        "lr_scheduler_type": "constant",
        "disable_tqdm": True,
        **overrides,
    }
    return transformers.TrainingArguments(**options)


@pytest.mark.parametrize("build, classes", [(gpt2, None), (bert, 3)], ids=["gpt2", "bert"])
def test_a_model_trains_with_its_own_loss_and_the_loggers_see_the_step(tmp_path, build, classes):
    trainer = CurveBallTrainer(
        model=build(), args=arguments(tmp_path), train_dataset=Tokens(classes=classes)
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 8 and losses[-1] < losses[0]
    logged = [e for e in trainer.state.log_history if "curveball/lambd" in e]
    assert len(logged) == 8 and all("curveball/rho" in e for e in logged)
    assert trainer.optimizer is not None


def test_compute_loss_func_is_the_loss(tmp_path):
    calls = []

    def loss_func(outputs, labels, **kwargs):
        calls.append(1)
        return F.cross_entropy(outputs["logits"], labels)

    trainer = CurveBallTrainer(
        model=bert(),
        args=arguments(tmp_path, max_steps=2),
        train_dataset=Tokens(classes=3),
        compute_loss_func=loss_func,
    )
    trainer.train()
    assert len(calls) >= 2


def test_resuming_from_a_trainer_checkpoint_is_exact(tmp_path):
    straight = CurveBallTrainer(
        model=gpt2(), args=arguments(tmp_path / "a", max_steps=6), train_dataset=Tokens()
    )
    straight.train()
    first = CurveBallTrainer(
        model=gpt2(),
        args=arguments(tmp_path / "b", max_steps=6, save_strategy="steps", save_steps=3),
        train_dataset=Tokens(),
    )
    first.train()
    resumed = CurveBallTrainer(
        model=gpt2(), args=arguments(tmp_path / "c", max_steps=6), train_dataset=Tokens()
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))
    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_gradient_accumulation_is_refused_with_a_reason(tmp_path):
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        CurveBallTrainer(
            model=gpt2(),
            args=arguments(tmp_path, gradient_accumulation_steps=2),
            train_dataset=Tokens(),
        )


def test_a_curvature_minibatch_cuts_a_models_keyword_inputs():
    """GPT-2 called with keyword tensors: on a batch of one half twice, the cut second
    pass gives the whole batch's step sizes (the 2×2 system's curvature is the same)."""
    from curveball import CurveBall
    from curveball.losses import cross_entropy

    ids = torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(1))
    ids = torch.cat([ids, ids])
    mask = torch.ones_like(ids)

    def sizes(fraction: float) -> tuple[list[tuple[float, float]], list[int]]:
        model = gpt2().double().eval()  # no dropout: a cut pass draws other masks
        seen: list[int] = []
        model.transformer.h[0].register_forward_pre_hook(lambda _, a: seen.append(a[0].shape[0]))
        opt = CurveBall(model, curvature_fraction=fraction)
        out = []
        for _ in range(3):
            opt.step(
                lambda: model(input_ids=ids, attention_mask=mask).logits.flatten(0, 1),
                cross_entropy(ids.flatten()),
            )
            out.append((opt.last.rho, opt.last.beta))
        return out, seen

    whole, _ = sizes(1.0)
    cut, seen = sizes(0.5)
    assert seen == [6, 3] * 3
    torch.testing.assert_close(torch.tensor(cut), torch.tensor(whole), rtol=1e-9, atol=1e-12)
