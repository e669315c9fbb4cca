"""Which engine a step uses, and the fallback rule: decided by where a failure happens."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from cases import NoForwardModeSquare, cross_entropy
from torch import nn
from torch.nn.utils import parametrizations, spectral_norm
from torch.utils.checkpoint import checkpoint

from curveball import CurveBall
from curveball._curvature import engine_choice
from curveball._curvature.engine_choice import EngineChoice


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.a, self.b, self.reentrant = nn.Linear(5, 8), nn.Linear(8, 3), reentrant

    def forward(self, x):
        hidden = checkpoint(lambda h: torch.tanh(self.a(h)), x, use_reentrant=self.reentrant)
        return self.b(hidden)


MODELS = {
    # name: (builder, the engine a step should use)
    "spectral_norm": (
        lambda: nn.Sequential(spectral_norm(nn.Linear(5, 8)), nn.Tanh(), nn.Linear(8, 3)),
        "forward",
    ),
    "parametrized_spectral_norm": (
        lambda: nn.Sequential(
            parametrizations.spectral_norm(nn.Linear(5, 8)), nn.Tanh(), nn.Linear(8, 3)
        ),
        "forward",
    ),
    "weight_norm": (
        lambda: nn.Sequential(
            parametrizations.weight_norm(nn.Linear(5, 8)), nn.Tanh(), nn.Linear(8, 3)
        ),
        "forward",
    ),
    "checkpoint_non_reentrant": (lambda: Checkpointed(reentrant=False), "double-backward"),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_train_by_default_on_the_fastest_path_that_works(name):
    build, engine = MODELS[name]
    torch.manual_seed(0)
    model = build().double()
    x = torch.randn(16, 5, dtype=torch.float64)
    t = torch.randint(0, 3, (16,))
    opt = CurveBall(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        losses = [opt.step(lambda: model(x), cross_entropy(t))[0].item() for _ in range(10)]
    assert opt.last.engine == engine
    assert losses[-1] < 0.7 * losses[0]
    fallbacks = [w for w in caught if "forward-mode AD failed" in str(w.message)]
    assert len(fallbacks) == (engine == "double-backward")


def test_float32_recurrent_layers_run_in_forward_mode():
    torch.manual_seed(0)
    lstm = nn.LSTM(4, 6, batch_first=True)
    head = nn.Linear(6, 3)
    model = nn.ModuleList([lstm, head])
    x = torch.randn(5, 7, 4)
    t = torch.randint(0, 3, (5,))
    opt = CurveBall(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        opt.step(lambda: head(lstm(x)[0][:, -1]), cross_entropy(t))
    assert opt.last.engine == "forward"


def test_a_user_error_is_raised_as_it_is_without_a_fallback_warning():
    model = nn.Linear(5, 3)
    opt = CurveBall(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
            opt.step(lambda: model(torch.randn(4, 6)), lambda y: y.sum())
    assert opt.steps == 0


def test_after_a_fallback_forward_mode_is_tried_again_later(monkeypatch):
    monkeypatch.setattr(engine_choice, "FIRST_RETRY", 2)
    lin = nn.Linear(3, 3).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    use_square = [True]

    def model_fn():
        h = lin(x)
        return NoForwardModeSquare.apply(h) if use_square[0] else h

    opt = CurveBall(lin)
    engines = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for step in range(8):
            use_square[0] = step < 1  # one unusual batch
            opt.step(model_fn, lambda y: y.pow(2).mean())
            engines.append(opt.last.engine)
    assert engines == ["double-backward"] * 3 + ["forward"] * 5


def test_the_retry_interval_doubles_while_forward_mode_keeps_failing(monkeypatch):
    monkeypatch.setattr(engine_choice, "FIRST_RETRY", 1)
    lin = nn.Linear(3, 3).double()
    choice = EngineChoice(list(lin.parameters()), None, "auto")
    assert choice.mode == "double-backward"  # no module: double backward only
    model = nn.Sequential(nn.Linear(3, 3)).double()
    opt = CurveBall(model)
    x = torch.randn(4, 3, dtype=torch.float64)
    tries = []
    real_attempt = EngineChoice._attempt

    def counting(self, engine, attempt):
        tries.append(type(engine).__name__)
        return real_attempt(self, engine, attempt)

    monkeypatch.setattr(EngineChoice, "_attempt", counting)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(7):
            opt.step(lambda: NoForwardModeSquare.apply(model(x)), lambda y: y.pow(2).mean())
    forward_tries = [i for i, name in enumerate(tries) if name == "ForwardModeEngine"]
    # steps 1, 3, 6 try forward mode (waits of 1, then 2); each failure is followed by a retry
    assert len(forward_tries) == 3


def test_forward_mode_only_raises_the_original_error():
    model = nn.Linear(3, 3).double()
    opt = CurveBall(model, forward_mode="forward")
    with pytest.raises(NotImplementedError, match="jvp"):
        opt.step(
            lambda: NoForwardModeSquare.apply(model(torch.randn(2, 3, dtype=torch.float64))),
            lambda y: F.mse_loss(y, torch.zeros_like(y)),
        )


@pytest.mark.parametrize(("double_share", "expected"), [(0.5, "double-backward"), (0.9, "auto")])
def test_fastest_keeps_the_engine_whose_measured_step_was_faster(monkeypatch, double_share,
                                                                 expected):  # fmt: skip
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    params = list(model.parameters())
    choice = EngineChoice(params, engine_choice.ModuleTensors(model, params), "fastest")
    clock = {"now": 0.0}
    durations = iter([1.0, double_share, 1.0, 1.0, 1.0, 1.0])  # the calls' lengths, in order
    monkeypatch.setattr(engine_choice.time, "perf_counter", lambda: clock["now"])
    used = []

    def attempt(engine):
        used.append(type(engine).__name__)
        clock["now"] += next(durations)

    for _ in range(5):
        choice.run(attempt, lambda: None)
    assert used[:4] == ["DoubleBackwardEngine"] * 2 + ["ForwardModeEngine"] * 2
    assert choice.mode == expected
    later = "DoubleBackwardEngine" if expected == "double-backward" else "ForwardModeEngine"
    assert used[4] == later


def test_fastest_measures_a_model_with_input_derivatives_after_it_is_recognised():
    """The first call of such a model is repeated without the lean rules (InputDerivativesSeen):
    the repetition must neither end the measurement nor count as one of its calls."""
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    x = torch.rand(6, 2, dtype=torch.float64, requires_grad=True)

    def residual():
        (g,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
        return g.reshape(-1)

    opt = CurveBall(model, forward_mode="fastest")
    engines = []
    for _ in range(5):
        opt.step(residual, lambda r: 0.5 * (r**2).sum())
        engines.append(opt.last.engine)
    assert engines[:4] == ["double-backward", "double-backward", "forward", "forward"]
    assert opt._layout.engines.mode in ("auto", "double-backward")
