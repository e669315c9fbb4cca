"""``CurveBallTrainer``: the Hugging Face ``transformers.Trainer`` with CurveBall.

Swap it in for ``Trainer`` with the same arguments::

    trainer = CurveBallTrainer(model=model, args=args, train_dataset=data)
    trainer.train()

Each training step runs one CurveBall step (its own forward-mode and backward
passes) on the batch; the Trainer's own ``optimizer.step()`` that follows is
then a no-op. The loss is the model's own loss, as a function of its logits
(causal and masked language models, sequence and token classification), or
``compute_loss_func(outputs, labels)`` when the Trainer was given one (``outputs``
then holds ``logits`` only). ρ, β, λ and the trust ratio go to the Trainer's
loggers beside the loss, and checkpoints carry the whole optimizer state, so
``train(resume_from_checkpoint=...)`` resumes exactly.

``TrainingArguments`` and CurveBall:

* ``learning_rate`` is not used: CurveBall's step size α is 1 unless
  ``curveball_kwargs={"lr": ...}`` says otherwise. The Trainer's learning-rate
  schedule (``lr_scheduler_type``, ``warmup_*``) multiplies α as it would a
  learning rate; use ``lr_scheduler_type="constant"`` for the method as published.
* ``weight_decay`` becomes CurveBall's weight decay κ (L2, in the gradient and the
  curvature) on the parameters the Trainer would decay.
* ``max_grad_norm`` has no effect (CurveBall fills no ``.grad``; its step length is
  set by the quadratic model and the damping).
* ``gradient_accumulation_steps`` must be 1: CurveBall solves for its step sizes on
  each batch and cannot add up partial steps; use a larger batch instead.
* ``fp16``/``bf16`` autocast: see the README's mixed-precision section.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import Trainer

from curveball import CurveBall

LOGGED = ("rho", "beta", "lambd", "trust_ratio")


class _TrainerCurveBall(CurveBall):
    """CurveBall whose argument-less ``step()`` (the Trainer's own call) does nothing."""

    def step(self, model_fn=None, loss_fn=None, closure=None):  # type: ignore[override]
        if model_fn is None and loss_fn is None and closure is None:
            return None  # the step already ran in CurveBallTrainer.training_step
        return super().step(model_fn, loss_fn, closure)


class CurveBallTrainer(Trainer):
    """A ``transformers.Trainer`` that trains with CurveBall (see the module docstring).

    Args:
        *args: as for ``Trainer``.
        curveball_kwargs: keyword arguments of :class:`~curveball.CurveBall`.
        **kwargs: as for ``Trainer`` (an ``optimizers=`` pair is refused).
    """

    def __init__(self, *args: Any, curveball_kwargs: dict[str, Any] | None = None, **kwargs: Any):
        if kwargs.get("optimizers", (None, None))[0] is not None:
            raise ValueError("optimizers: CurveBallTrainer builds its own CurveBall optimizer")
        super().__init__(*args, **kwargs)
        if self.args.gradient_accumulation_steps != 1:
            raise ValueError(
                "gradient_accumulation_steps: CurveBall solves for its step sizes on every batch "
                f"and cannot accumulate partial steps; got {self.args.gradient_accumulation_steps}"
                ", use 1 (and a larger per-device batch) instead"
            )
        self.curveball_kwargs = dict(curveball_kwargs or {})
        self._curveball_logs: dict[str, float] = {}

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            module = self.model if model is None else model
            decayed = set(self.get_decay_parameter_names(module))
            groups = [
                {
                    "params": [p for n, p in module.named_parameters() if n in decayed],
                    "weight_decay": self.args.weight_decay,
                },
                {
                    "params": [p for n, p in module.named_parameters() if n not in decayed],
                    "weight_decay": 0.0,
                },
            ]
            groups = [g for g in groups if g["params"]]
            self.optimizer = _TrainerCurveBall(groups, model=module, **self.curveball_kwargs)
        return self.optimizer

    def _curveball(self) -> CurveBall:
        optimizer = self.optimizer
        while not isinstance(optimizer, CurveBall):  # accelerate wraps it
            optimizer = optimizer.optimizer
        return optimizer

    def training_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: Any = None,
    ) -> torch.Tensor:
        model.train()
        inputs = dict(self._prepare_inputs(inputs))
        labels = inputs.pop("labels", None)
        if labels is None:
            raise ValueError("CurveBallTrainer: the batch has no 'labels' to compute a loss from")
        module = self.model  # the module CurveBall was built on (not a wrapper)
        loss_fn = self._loss_of_logits(module, labels)
        loss, _ = self._curveball().step(lambda: module(**inputs).logits, loss_fn)
        info = self._curveball().last
        if info is not None:
            values = info.as_dict()
            self._curveball_logs = {f"curveball/{name}": values[name] for name in LOGGED}
        return loss.detach()

    def _loss_of_logits(
        self, module: torch.nn.Module, labels: torch.Tensor
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """The loss as a function of the logits (averaged over the local batch)."""
        if self.compute_loss_func is not None:
            return lambda y: self.compute_loss_func({"logits": y}, labels)
        loss_function = getattr(module, "loss_function", None)
        kind = getattr(loss_function, "__name__", "")
        config = module.config
        if kind in ("ForCausalLMLoss", "ForMaskedLMLoss"):
            return lambda y: loss_function(logits=y, labels=labels, vocab_size=config.vocab_size)
        if kind == "ForSequenceClassificationLoss":
            return lambda y: loss_function(labels=labels, pooled_logits=y, config=config)
        if kind == "ForTokenClassification":
            return lambda y: loss_function(logits=y, labels=labels, config=config)
        raise ValueError(
            f"CurveBallTrainer: cannot take the loss of {type(module).__name__} as a function of "
            "its logits; pass compute_loss_func=lambda outputs, labels, **kw: ... to the Trainer"
        )

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:  # a training log: add the last step's ρ, β, λ, trust ratio
            logs = {**logs, **self._curveball_logs}
        super().log(logs, *args, **kwargs)
