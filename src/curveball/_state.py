"""The optimizer's global state: λ, the step count and the last automatic ρ, β.

Per-parameter state (the running estimate ``z``) lives in ``optimizer.state[p]``
as in every ``torch.optim`` optimizer. What belongs to the whole optimizer is
this one record; ``state_dict()`` carries it under the key ``"curveball"``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from curveball._loss_scale import after_finite

STATE_KEY = "curveball"


@dataclass
class CurveBallState:
    """The optimizer-wide state.

    Attributes:
        lambd: the current damping λ.
        step: the number of steps taken.
        rho: the last automatically solved momentum ρ (reused between refreshes).
        beta: the last automatically solved step β.
        psd_loss: whether the loss was found not convex in the predictions, so that
            the positive part of its Hessian is used (see ``loss_derivatives``).
        loss_scale: the scale of the backward pass when float16 is in use (see
            ``_loss_scale.py``).
        scaled_steps: float16 steps since the scale last changed.
    """

    lambd: float
    step: int = 0
    rho: float | None = None
    beta: float | None = None
    psd_loss: bool = False
    loss_scale: float = 2.0**16
    scaled_steps: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(saved: Any) -> CurveBallState:
        """The state from :meth:`to_dict`'s output, or from the 0.1.0 release's layout.

        Raises:
            ValueError: if a value is missing or out of range.
        """
        if not isinstance(saved, dict):
            raise ValueError(f"state_dict['{STATE_KEY}']: expected a dict, got {type(saved)}")
        saved = dict(saved)
        if "steps" in saved:  # 0.1.0: {"lambd", "steps", "last_sizes": (ρ, β) or None}
            sizes = saved.pop("last_sizes", None)
            saved["step"] = saved.pop("steps")
            saved["rho"], saved["beta"] = sizes if sizes is not None else (None, None)
        try:
            state = CurveBallState(
                lambd=float(saved["lambd"]),
                step=int(saved["step"]),
                rho=None if saved.get("rho") is None else float(saved["rho"]),
                beta=None if saved.get("beta") is None else float(saved["beta"]),
                psd_loss=bool(saved.get("psd_loss", False)),
                loss_scale=float(saved.get("loss_scale", 2.0**16)),
                scaled_steps=int(saved.get("scaled_steps", 0)),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"state_dict['{STATE_KEY}']: malformed ({error!r})") from error
        scale_ok = state.loss_scale > 0.0 and math.isfinite(state.loss_scale)
        if (
            not (state.lambd >= 0.0 and math.isfinite(state.lambd))
            or state.step < 0
            or not scale_ok
        ):
            raise ValueError(f"state_dict['{STATE_KEY}']: out of range: {state}")
        return state

    def count(self, step: int, finite_float16: bool) -> None:
        """After step ``step``: count it, and after a finite float16 step grow the scale."""
        self.step = step
        if finite_float16:
            self.loss_scale, self.scaled_steps = after_finite(self.loss_scale, self.scaled_steps)

    @property
    def sizes(self) -> tuple[float, float] | None:
        """The last automatic ``(ρ, β)``, if any."""
        if self.rho is None or self.beta is None:
            return None
        return self.rho, self.beta


def saved_states(state_dict: dict[str, Any], groups: list[dict]) -> list[tuple]:
    """``(saved id, parameter, saved state)`` triples, matched as ``torch.optim`` matches
    saved state to parameters (by position across the groups)."""
    saved_ids = [i for g in state_dict.get("param_groups", []) for i in g.get("params", [])]
    params = [p for g in groups for p in g["params"]]
    by_id = dict(zip(saved_ids, params, strict=False))
    return [
        (index, by_id[index], state)
        for index, state in state_dict.get("state", {}).items()
        if isinstance(state, dict) and index in by_id
    ]


def check_saved_shapes(state_dict: dict[str, Any], groups: list[dict]) -> None:
    """Refuse a checkpoint whose ``z`` does not fit the parameters, before anything loads."""
    for index, p, state in saved_states(state_dict, groups):
        z = state.get("z")
        if isinstance(z, torch.Tensor) and tuple(z.shape) != tuple(p.shape):
            raise ValueError(
                f"state_dict: z of parameter {index} has shape {tuple(z.shape)}, but the "
                f"parameter has shape {tuple(p.shape)}: the checkpoint belongs to another "
                "model"
            )


def split_saved(
    state_dict: dict[str, Any], groups: list[dict], average_key: str = "dz_square_average"
) -> tuple[dict[str, Any], CurveBallState | None, list[tuple[torch.Tensor, torch.Tensor]]]:
    """A checkpoint checked and taken apart: the ``torch.optim`` part, the global record
    (``None`` if absent) and the preconditioner's saved averages by parameter (which
    ``torch.optim`` would cast to the parameter's dtype)."""
    state_dict = dict(state_dict)
    saved = state_dict.pop(STATE_KEY, None)
    record = CurveBallState.from_dict(saved) if saved is not None else None
    check_saved_shapes(state_dict, groups)
    averages = [
        (p, state[average_key])
        for _, p, state in saved_states(state_dict, groups)
        if isinstance(state.get(average_key), torch.Tensor)
    ]
    return state_dict, record, averages


def group_defaults(groups: list[dict], defaults: dict[str, Any]) -> None:
    """Fill in the hyper-parameters that an older checkpoint's groups lack.

    0.1.0 kept only ``lr`` and ``weight_decay`` in the groups: the others come from the
    constructor, except the preconditioner, which no older checkpoint trained with.
    Options added later than the checkpoint take the constructor's values.
    """
    for group in groups:
        for name, value in defaults.items():
            group.setdefault(name, False if name == "precondition" else value)
