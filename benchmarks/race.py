"""The wall-clock race: how fast each optimizer reaches the best tuned Adam's training loss.

Every contender trains the same task from the same initial weights on the same
batch order, in lockstep: one step of each contender per round (the order
rotating), with only the steps timed, so machine noise hits all alike. Every
``--eval-every`` steps the loss over the whole training set is measured
(untimed, evaluation mode).

A *tuned* method (SGD, Adam, AdamW, Muon and ``curveball-tuned``) has a grid of
learning rates (``LR_GRIDS``). With ``--grid full`` (the default) every point of the
grid is a trial of its own, raced in the lockstep like any contender; with
``--grid pre-run`` (the old, faster way) a short pre-run of every grid point
(``--pre-steps``, timed alone) picks one learning rate, and only that one races.
Every other contender is *untuned*: one run at its defaults. Per task the race reports

* the target: the best final training loss over every Adam and AdamW trial. A run
  reaches it at its first evaluation after step 0 at or below it, and only a target
  below the initial loss can be reached (when the budget is too small for the best
  Adam to get below the initial loss, the table says that no contender reached it);
* for every method two times to the target, both in stepping seconds (evaluations
  excluded):

  - *seconds to target* (the best run): a tuned method's best trial (the one that got
    there first: the AlgoPerf external-tuning view), an untuned method's single run;
  - *grid seconds* (what the tuning cost): a tuned method's
    Σ over its grid's trials of the seconds each trial stepped until it reached the
    target, or of its whole run if it never did (until it failed, for a trial that
    failed); "not reached" when no trial reached it. With ``--grid pre-run``: the
    pre-runs' stepping seconds plus the chosen run's seconds to target. An untuned
    method's grid is its single run: the same seconds as its best run;

  each relative to the best Adam's (the method, Adam or AdamW, whose trial set the
  target); the steps to target; the loss the best run has reached when the best Adam's
  best run has used up all its time; and its median step time relative to SGD's;
* for every CurveBall contender: its skipped or rejected steps, by reason;

and plots loss against wall-clock and against steps (one line per method, its best
run; a tuned method's other trials faint) beside the two times as bars.

Tasks: the paper's MNIST MLP (784-128-64-32-10, tanh), the 784-512-512-10 ReLU MLP,
the paper's basic CNN with and without batch norm (MNIST 8,000/2,000 split of the
official test files under ``--data-dir``), and a small causal transformer and an
LSTM character-level language model on the Python standard library's source
(read at run time). Contenders: CurveBall at its defaults, ``curveball-paper``
with ``curveball.PAPER_DEFAULTS`` (the authors' method: no preconditioner, λ
starting at 1, the paper's damping rule), ``curveball-paper-damping`` with the
defaults but the paper's damping rule (λ × 0.999 or ÷ 0.999 per step, no floor),
``curveball-no-floor`` with the defaults but no floor under λ (``lambda_min=0``),
``curveball-lazy`` solving for ρ and β on every 5th step only,
``curveball-minibatch`` computing the second forward-mode pass on a quarter of
the batch (``curvature_fraction=0.25``), and ``curveball-tuned`` with its
initial λ tuned over a grid like the first-order learning rates (every CurveBall
uses the closed-form ``curveball.losses.cross_entropy``); SGD with momentum 0.9, Adam
and AdamW over their learning-rate grids; Muon on the transformer only (its hidden
matrices; AdamW for the rest) over its grid; and, at their documented defaults
(``PEERS``), HeavyBall's SOAP and PSGD-Kron, pytorch-optimizer's SophiaH, AdaHessian
and Shampoo, and the learning-rate-free Prodigy, D-Adaptation's Adam,
Schedule-Free AdamW, DoG and Mechanic (around Adam). A peer whose package is not
installed is skipped with a line saying so (``pip install curveball[race]`` installs
them all: ``RACE_EXTRA``).

Example::

    python -m benchmarks.race --budget 400 --json out/race.json --plots out/race
"""

from __future__ import annotations

import argparse
import copy
import importlib
import math
import os
import statistics
import sysconfig
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import common, plots
from curveball import PAPER_DEFAULTS, CurveBall, losses

Step = Callable[[torch.Tensor, torch.Tensor], None]

LR_GRIDS = {
    "curveball-tuned": (0.3, 0.1, 0.03, 0.01),  # the initial damping λ, not a learning rate
    "sgd": (0.01, 0.03, 0.1, 0.3),
    "adam": (3e-4, 1e-3, 3e-3, 1e-2),
    "adamw": (3e-4, 1e-3, 3e-3, 1e-2),
    "muon": (0.01, 0.02, 0.05, 0.1),  # Muon's; its AdamW group at MUON_ADAMW_RATIO × that
}
MUON_ADAMW_RATIO = 3e-4 / 0.02
"""The AdamW learning rate of Muon's other parameters relative to Muon's own: the ratio of
the Muon README's ``MuonWithAuxAdam`` example (3e-4 against 0.02)."""
TARGET_METHODS = ("adam", "adamw")
SEQ, VOCAB = 64, 128


# ------------------------------------------------------------------------------------ tasks
class Padded(nn.Module):
    """Zero-pads 28x28 images to 32x32 for the CIFAR-sized basic CNN."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(F.pad(x, (2, 2, 2, 2)))


class CharTransformer(nn.Module):
    def __init__(self, width: int = 64, layers: int = 2) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, width)
        self.position = nn.Parameter(0.02 * torch.randn(SEQ, width))
        layer = nn.TransformerEncoderLayer(
            width, 4, 4 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, tokens):
        causal = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        h = self.embedding(tokens) + self.position[: tokens.shape[1]]
        return self.head(self.encoder(h, mask=causal, is_causal=True)).flatten(0, 1)


def transformer_hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The 2-D weights inside the encoder blocks (attention's fused input and its output
    projection, the feed-forward layers): Muon's. Not the embedding, the position
    parameter, the head, the biases or the norms."""
    return [p for p in model.encoder.parameters() if p.ndim == 2]


@dataclass
class Task:
    name: str
    build: Callable[[], nn.Module]
    data: str  # "mnist" or "text"
    batch_size: int = 128
    hidden_matrices: Callable[[nn.Module], list[nn.Parameter]] | None = None  # Muon's, if any


TASKS = {
    t.name: t
    for t in (
        Task("mnist-mlp", lambda: common.mlp((784, 128, 64, 32, 10), nn.Tanh), "mnist"),
        Task("mnist-mlp-512", lambda: common.mlp(), "mnist"),
        Task("mnist-cnn", lambda: Padded(common.basic_cnn(in_channels=1)), "mnist"),
        Task("mnist-cnn-bn", lambda: Padded(common.basic_cnn(True, in_channels=1)), "mnist"),
        Task("char-transformer", CharTransformer, "text", 32, transformer_hidden_matrices),
        Task("char-lstm", lambda: common.CharLSTM(VOCAB), "text", 32),
    )
}


def stdlib_text(chars: int) -> str:
    """The first ``chars`` characters of the standard library's sources, in sorted order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text)
        if total >= chars:
            break
    return "".join(parts)[:chars]


def text_windows(chars: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows of ``SEQ + 1`` characters (ASCII; others map to 127)."""
    codes = torch.tensor([min(ord(c), VOCAB - 1) for c in stdlib_text(chars)])
    windows = codes[: len(codes) // (SEQ + 1) * (SEQ + 1)].view(-1, SEQ + 1)
    return windows[:, :-1].contiguous(), windows[:, 1:].reshape(len(windows), -1)


def load_data(task: Task, data_dir: str, text_chars: int) -> tuple[torch.Tensor, torch.Tensor]:
    if task.data == "mnist":
        split = common.mnist_8k_2k(data_dir)
        return split["x_train"], split["y_train"]
    return text_windows(text_chars)


# ------------------------------------------------------------------------------ contenders
@dataclass
class Contender:
    """One run in the race: a method (``name``) at one grid point ``lr`` (``None``: untuned)."""

    name: str
    model: nn.Module
    step: Step
    lr: float | None = None
    times: list[float] = field(default_factory=list)
    curve: list[tuple[int, float, float]] = field(default_factory=list)  # step, seconds, loss
    error: str | None = None
    skipped: dict[str, int] = field(default_factory=dict)  # CurveBall's skipped steps by reason


def _targets(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1)


def gradient_step(opt: torch.optim.Optimizer, model: nn.Module, create_graph: bool = False):
    def step(x: torch.Tensor, t: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), _targets(t)).backward(create_graph=create_graph)
        opt.step()

    return step


def curveball_step(opt: CurveBall, model: nn.Module, closed_form: bool = True):
    """A CurveBall step on cross-entropy: ``curveball.losses``' closed form, or (with
    ``closed_form=False``) the plain function, whose derivatives come from autograd."""

    def step(x: torch.Tensor, t: torch.Tensor) -> None:
        if closed_form:
            loss_fn = losses.cross_entropy(_targets(t))
        else:
            loss_fn = lambda y: F.cross_entropy(y, _targets(t))  # noqa: E731
        opt.step(lambda: model(x), loss_fn)

    step.optimizer = opt  # type: ignore[attr-defined]  # the race counts its skipped steps
    return step


class Chained:
    """Optimizers over disjoint parameter sets, zeroed and stepped as one."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = optimizers

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()


def muon_step(model: nn.Module, hidden: list[nn.Parameter], lr: float) -> Step:
    """Muon (Jordan et al. 2024, ``torch.optim.Muon``: momentum 0.95, Nesterov, 5
    Newton-Schulz steps, its shape scaling of the step) at ``lr`` with weight decay 0.01 on
    the ``hidden`` matrices, and AdamW (betas 0.9/0.95, weight decay 0.01) at
    ``lr × MUON_ADAMW_RATIO`` on every other parameter: the split and the values of the
    Muon README's ``MuonWithAuxAdam`` example (0.02 and 3e-4)."""
    if not hasattr(torch.optim, "Muon"):
        raise MissingPackage("torch", "this torch has no torch.optim.Muon: a newer torch has")
    ids = {id(p) for p in hidden}
    rest = [p for p in model.parameters() if id(p) not in ids]
    muon = torch.optim.Muon(hidden, lr=lr, weight_decay=0.01)
    adamw = torch.optim.AdamW(rest, lr=lr * MUON_ADAMW_RATIO, betas=(0.9, 0.95), weight_decay=0.01)
    return gradient_step(Chained(muon, adamw), model)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ the peers
class MissingPackage(ImportError):
    """A contender's package is not installed."""

    def __init__(self, package: str, message: str | None = None) -> None:
        self.package = package
        super().__init__(
            message
            or f"package {package!r} is not installed: pip install curveball[race] (every "
            f"peer) or pip install {package}"
        )


@dataclass(frozen=True)
class Peer:
    """An optimizer from another package, raced untuned at its documented defaults."""

    package: str  # the distribution that pip installs
    module: str  # the module that Python imports
    build: Callable[[ModuleType, nn.Module, int], Step]  # (module, model, batch size) -> step

    def step(self, model: nn.Module, batch_size: int) -> Step:
        try:
            module = importlib.import_module(self.module)
        except ImportError as error:
            raise MissingPackage(self.package) from error
        return self.build(module, model, batch_size)


def measured_by(step: Step, loss: Callable[[torch.Tensor, torch.Tensor], float]) -> Step:
    """``step``, with the training loss measured where its method says (``evaluate`` calls
    ``loss(x, t)`` instead of measuring the model's weights)."""
    step.evaluate = loss  # type: ignore[attr-defined]
    return step


def _soap(heavyball: ModuleType, model: nn.Module, batch_size: int) -> Step:
    """HeavyBall's SOAP at its defaults, without torch.compile (none on this CPU)."""
    heavyball.utils.compile_mode = None
    return gradient_step(heavyball.SOAP(model.parameters()), model)


def _psgd_kron(heavyball: ModuleType, model: nn.Module, batch_size: int) -> Step:
    """HeavyBall's PSGD-Kron at its defaults, without torch.compile."""
    heavyball.utils.compile_mode = None
    return gradient_step(heavyball.PSGDKron(model.parameters()), model)


def _sophiah(po: ModuleType, model: nn.Module, batch_size: int) -> Step:
    """pytorch-optimizer's SophiaH at its defaults (Hessian-vector products: a graph kept)."""
    return gradient_step(po.SophiaH(model.parameters()), model, True)


def _adahessian(po: ModuleType, model: nn.Module, batch_size: int) -> Step:
    """pytorch-optimizer's AdaHessian at its defaults (Hessian-vector products)."""
    return gradient_step(po.AdaHessian(model.parameters()), model, True)


def _shampoo(po: ModuleType, model: nn.Module, batch_size: int) -> Step:
    """pytorch-optimizer's Shampoo at its defaults."""
    return gradient_step(po.Shampoo(model.parameters()), model)


def _prodigy(prodigyopt: ModuleType, model: nn.Module, batch_size: int) -> Step:
    """Prodigy (Mishchenko & Defazio, arXiv:2306.06101) at lr=1.0, as its README recommends
    for all networks; the rest at its defaults (betas 0.9/0.999, d0=1e-6, d_coef=1, no
    weight decay), with no schedule."""
    return gradient_step(prodigyopt.Prodigy(model.parameters(), lr=1.0), model)


def _dadapt_adam(dadaptation: ModuleType, model: nn.Module, batch_size: int) -> Step:
    """D-Adaptation's Adam (Defazio & Mishchenko, arXiv:2301.07733) at lr=1.0, as its README
    says to set it; the rest at its defaults (betas 0.9/0.999, d0=1e-6, no weight decay)."""
    return gradient_step(dadaptation.DAdaptAdam(model.parameters(), lr=1.0), model)


def _schedulefree_adamw(schedulefree: ModuleType, model: nn.Module, batch_size: int) -> Step:
    """Schedule-Free AdamW (Defazio et al., arXiv:2405.15682) at its defaults (lr=0.0025,
    betas 0.9/0.999, no warm-up, no weight decay), evaluated at its averaged point x as its
    README requires (``schedule_free_loss``)."""
    opt = schedulefree.AdamWScheduleFree(model.parameters())
    opt.train()
    return measured_by(
        gradient_step(opt, model), lambda x, t: schedule_free_loss(opt, model, x, t, batch_size)
    )


def _dog(dog: ModuleType, model: nn.Module, batch_size: int) -> Step:
    """DoG (Ivgi, Hinder & Carmon, arXiv:2302.12022) at its defaults (reps_rel=1e-6, lr=1,
    no weight decay), with the iterate averaging that its README calls a must for fair
    comparison: ``PolynomialDecayAverager`` at its default γ=8, updated after every step
    (timed with it), and the averaged model is the one evaluated."""
    opt = dog.DoG(model.parameters())
    averager = dog.PolynomialDecayAverager(model)
    descend = gradient_step(opt, model)

    def step(x: torch.Tensor, t: torch.Tensor) -> None:
        descend(x, t)
        averager.step()

    return measured_by(step, lambda x, t: training_loss(averager.averaged_model, x, t))


def _mechanic(mechanic_pytorch: ModuleType, model: nn.Module, batch_size: int) -> Step:
    """Mechanic (Cutkosky, Defazio & Mehta, arXiv:2306.00144) tuning torch.optim.Adam's scale:
    ``mechanize(torch.optim.Adam)`` at its defaults (s_decay=0.01, betas 0.9 … 0.999999,
    s_init=1e-8) with the base lr=1.0 of its README's example."""
    mechanized = mechanic_pytorch.mechanize(torch.optim.Adam)
    return gradient_step(mechanized(model.parameters(), lr=1.0), model)


PEERS: dict[str, Peer] = {
    "soap": Peer("heavyball", "heavyball", _soap),
    "psgd-kron": Peer("heavyball", "heavyball", _psgd_kron),
    "sophiah": Peer("pytorch-optimizer", "pytorch_optimizer", _sophiah),
    "adahessian": Peer("pytorch-optimizer", "pytorch_optimizer", _adahessian),
    "shampoo": Peer("pytorch-optimizer", "pytorch_optimizer", _shampoo),
    "prodigy": Peer("prodigyopt", "prodigyopt", _prodigy),
    "dadapt-adam": Peer("dadaptation", "dadaptation", _dadapt_adam),
    "schedulefree-adamw": Peer("schedulefree", "schedulefree", _schedulefree_adamw),
    "dog": Peer("dog-optimizer", "dog", _dog),
    "mechanic": Peer("mechanic-pytorch", "mechanic_pytorch", _mechanic),
}
"""The peers from other packages, by contender name (each builder's docstring says how)."""

RACE_EXTRA = sorted({peer.package for peer in PEERS.values()})
"""The packages of every peer: what ``pip install curveball[race]`` is to install."""


def missing_requirement(name: str) -> MissingPackage | None:
    """What a contender lacks here (its package, or torch's Muon), or ``None``."""
    if name == "muon" and not hasattr(torch.optim, "Muon"):
        return MissingPackage("torch", "this torch has no torch.optim.Muon: a newer torch has")
    peer = PEERS.get(name)
    if peer is None:
        return None
    try:
        importlib.import_module(peer.module)
    except ImportError:
        return MissingPackage(peer.package)
    return None


FIRST_ORDER = {
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
    "adamw": lambda params, lr: torch.optim.AdamW(params, lr=lr),
}


def make_step(
    name: str, model: nn.Module, lr: float | None = None, task: Task | None = None
) -> Step:
    """A contender's step on ``model``: ``lr`` is a tuned method's grid point; ``task`` gives
    Muon its hidden matrices and Schedule-Free its batch size (batch-norm statistics)."""
    if name in CURVEBALL_OPTIONS:
        return curveball_step(CurveBall(model, **CURVEBALL_OPTIONS[name]), model)
    if name == "curveball-tuned":
        return curveball_step(CurveBall(model, lambd=lr), model)
    if name in FIRST_ORDER:
        return gradient_step(FIRST_ORDER[name](model.parameters(), lr), model)
    if name == "muon":
        if task is None or task.hidden_matrices is None:
            raise ValueError("muon: the task names no hidden matrices (Task.hidden_matrices)")
        return muon_step(model, task.hidden_matrices(model), lr)
    return PEERS[name].step(model, 128 if task is None else task.batch_size)


PAPER_DAMPING = {k: PAPER_DEFAULTS[k] for k in ("lambda_factor", "lambda_thresholds", "lambda_min")}
"""The paper's damping rule: every 5 steps, λ × 0.999⁵ when the trust ratio exceeds 1.5 and
λ / 0.999⁵ when it is below 0.5, with no floor (the defaults: × 2/3 above 3/4, × 3/2 below
1/4, not below 0.05)."""

CURVEBALL_OPTIONS = {
    "curveball": {},
    "curveball-paper": PAPER_DEFAULTS,
    "curveball-paper-damping": PAPER_DAMPING,
    "curveball-no-floor": {"lambda_min": 0.0},
    "curveball-lazy": {"step_size_interval": 5},
    "curveball-minibatch": {"curvature_fraction": 0.25},
}
"""CurveBall contenders by their constructor keywords. ``curveball-lazy`` solves for ρ and β
only on the trust-region test steps (every 5th), skipping the second forward-mode pass on
the others; ``curveball-minibatch`` estimates the curvature terms of the 2×2 system on the
first quarter of the batch; ``curveball-tuned`` (not here) tunes its initial λ over
``LR_GRIDS`` like the first-order optimizers tune their learning rate."""

CONTENDERS = ("curveball", "curveball-paper", "curveball-paper-damping", "curveball-no-floor",
              "curveball-lazy", "curveball-minibatch", "curveball-tuned", "sgd", "adam",
              "adamw", "muon", "soap", "psgd-kron", "sophiah", "adahessian", "shampoo",
              "prodigy", "dadapt-adam", "schedulefree-adamw", "dog", "mechanic")  # fmt: skip


# ------------------------------------------------------------------------------ the race
@torch.no_grad()
def training_loss(model: nn.Module, x: torch.Tensor, t: torch.Tensor, chunk: int = 1000) -> float:
    was_training = model.training
    model.eval()
    total = 0.0
    for start in range(0, len(x), chunk):
        logits = model(x[start : start + chunk])
        total += float(F.cross_entropy(logits, _targets(t[start : start + chunk]), reduction="sum"))
    model.train(was_training)
    return total / _targets(t).numel()


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@torch.no_grad()
def recompute_batch_norm(model: nn.Module, x: torch.Tensor, batch_size: int, batches: int) -> None:
    """Batch norm's running statistics refreshed by forward passes (train mode, no gradients)
    over the first ``batches`` training batches."""
    model.train()
    for start in range(0, min(len(x), batches * batch_size), batch_size):
        model(x[start : start + batch_size])


def schedule_free_loss(opt, model: nn.Module, x, t, batch_size: int, batches: int = 50) -> float:
    """The training loss at Schedule-Free's averaged point x: ``opt.eval()`` swaps x in;
    with batch norm the running statistics are first recomputed at x on 50 training
    batches (its README's caveat); ``opt.train()`` swaps the gradient point y back."""
    opt.eval()
    try:
        if any(isinstance(m, _BATCH_NORMS) for m in model.modules()):
            recompute_batch_norm(model, x, batch_size, batches)
        return training_loss(model, x, t)
    finally:
        opt.train()


def evaluate(c: Contender, x: torch.Tensor, t: torch.Tensor) -> float:
    """A contender's training loss, where its method says to measure it (``step.evaluate``:
    an averaged point) or else at its weights."""
    hook = getattr(c.step, "evaluate", None)
    return hook(x, t) if hook is not None else training_loss(c.model, x, t)


def batches(n: int, batch_size: int, steps: int, seed: int):
    """The same batch order for every contender: epochs of seeded permutations."""
    out, epoch = [], 0
    while len(out) < steps:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        out += [order[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
        epoch += 1
    return out[:steps]


def pick_lr(name: str, task: Task, init: nn.Module, x, t, order, pre_steps: int):
    """The learning rate of the grid with the lowest training loss after ``pre_steps``, with
    every grid point's loss and its pre-run's stepping seconds (``--grid pre-run``)."""
    scores, seconds = {}, {}
    for lr in LR_GRIDS[name]:
        model = copy.deepcopy(init)
        step = make_step(name, model, lr, task)
        spent = 0.0
        for idx in order[:pre_steps]:
            xb, tb = x[idx], t[idx]
            start = time.perf_counter()
            step(xb, tb)
            spent += time.perf_counter() - start
        loss = training_loss(model, x, t)
        scores[lr] = loss if math.isfinite(loss) else math.inf
        seconds[lr] = spent
    return min(scores, key=scores.get), scores, seconds


def lockstep_round(contenders: list[Contender], xb: torch.Tensor, tb: torch.Tensor) -> None:
    """One timed step of every contender, on the same batch."""
    for c in contenders:
        if c.error is not None:
            continue
        start = time.perf_counter()
        try:
            c.step(xb, tb)
        except Exception as error:  # a peer that cannot run here is listed with the reason
            c.error = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
            continue
        c.times.append(time.perf_counter() - start)
        last = getattr(getattr(c.step, "optimizer", None), "last", None)
        if last is not None and last.skipped:
            c.skipped[last.reason] = c.skipped.get(last.reason, 0) + 1


def _idle(x: torch.Tensor, t: torch.Tensor) -> None:
    return None


def enter(name: str, task: Task, init: nn.Module, lrs: list[float | None]) -> list[Contender]:
    """A method's runs: one per grid point, each on its own copy of the initial weights; one
    run, with the reason as its error, when what it needs is not installed here."""
    missing = missing_requirement(name)
    if missing is not None:
        print(f"{task.name}: {name} skipped: {missing}", flush=True)
        return [Contender(name, init, _idle, error=f"skipped: {missing}")]
    runs = []
    for lr in lrs:
        model = copy.deepcopy(init)
        runs.append(Contender(name, model, make_step(name, model, lr, task), lr))
    return runs


def grid_points(name: str, task: Task, init, x, t, order, args, grids: dict) -> list:
    """The learning rates a method races at: its whole grid (``--grid full``), the pre-run's
    choice (``--grid pre-run``, recorded in ``grids``), or ``[None]`` for an untuned one."""
    if name not in LR_GRIDS:
        return [None]
    if args.grid == "full" or missing_requirement(name) is not None:
        return list(LR_GRIDS[name])
    lr, scores, seconds = pick_lr(name, task, init, x, t, order, args.pre_steps)
    grids[name] = {"chosen": lr, "pre_run_loss": scores, "pre_run_seconds": seconds}
    return [lr]


def _evaluate_all(contenders: list[Contender], x, t, step_index: int) -> None:
    for c in contenders:
        if c.error is None:
            c.curve.append((step_index, sum(c.times), evaluate(c, x, t)))


def race_task(task: Task, args, x, t) -> dict:
    torch.manual_seed(args.seed)
    init = task.build()
    order = batches(len(x), task.batch_size, args.budget, args.seed)
    grids: dict[str, dict] = {}
    contenders: list[Contender] = []
    for name in args.contenders:
        if name == "muon" and task.hidden_matrices is None:
            continue  # Muon races where the task names its hidden matrices (the transformer)
        lrs = grid_points(name, task, init, x, t, order, args, grids)
        contenders += enter(name, task, init, lrs)
    first = training_loss(init, x, t)
    for c in contenders:
        c.curve.append((0, 0.0, first))
    for step_index, idx in enumerate(order, start=1):
        shift = step_index % len(contenders)
        lockstep_round(contenders[shift:] + contenders[:shift], x[idx], t[idx])
        if step_index % args.eval_every == 0 or step_index == len(order):
            _evaluate_all(contenders, x, t, step_index)
        if args.verbose and step_index % max(1, len(order) // 10) == 0:
            print(f"  {task.name}: step {step_index}/{len(order)}", flush=True)
    return summarise(task, contenders, grids)


# ---------------------------------------------------------------------------- the summary
def _first_reach(curve, target: float | None) -> tuple[int | None, float | None]:
    """The step and seconds of the first evaluation after step 0 at or below ``target``."""
    if target is None:
        return None, None
    for step, seconds, loss in curve[1:]:
        if loss <= target:
            return step, seconds
    return None, None


def trial_seconds(c: Contender, target: float | None) -> float:
    """What a run adds to its grid's time: its stepping seconds until it reached the target,
    or its whole run's if it never did (until it failed, for a run that failed)."""
    _, seconds = _first_reach(c.curve, target)
    return sum(c.times) if seconds is None else seconds


def _loss_at(curve, seconds: float) -> float:
    """The loss a contender had reached after ``seconds`` of its own stepping time."""
    reached = [loss for _, s, loss in curve if s <= seconds]
    return reached[-1] if reached else curve[0][2]


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference <= 0:
        return None
    return value / reference


def _finite(loss: float) -> float:
    return loss if math.isfinite(loss) else math.inf


def find_target(contenders: list[Contender]) -> tuple[float | None, str | None, bool]:
    """The best final loss over every Adam and AdamW run that finished, the method that
    reached it, and whether it is below the initial loss (a target that training reaches)."""
    finals = [
        (c.curve[-1][2], c.name, c.curve[0][2])
        for c in contenders
        if c.name in TARGET_METHODS and c.error is None and math.isfinite(c.curve[-1][2])
    ]
    if not finals:
        return None, None, False
    loss, name, first = min(finals)
    return loss, name, loss < first


def _trial(c: Contender, goal: float | None) -> dict:
    steps, seconds = _first_reach(c.curve, goal)
    return {
        "lr": c.lr,
        "error": c.error,
        "steps_to_target": steps,
        "seconds_to_target": seconds,
        "counted_seconds": trial_seconds(c, goal),
        "final_loss": c.curve[-1][2],
        "step_ms": statistics.median(c.times) * 1e3 if c.times else None,
        "skipped_steps": dict(c.skipped) if hasattr(c.step, "optimizer") else None,
        "curve": c.curve,
    }


def _best_trial(trials: list[dict]) -> dict:
    """The run that reached the target first, or (none did) the lowest final loss."""
    ran = [tr for tr in trials if tr["error"] is None] or trials
    reached = [tr for tr in ran if tr["seconds_to_target"] is not None]
    if reached:
        return min(reached, key=lambda tr: tr["seconds_to_target"])
    return min(ran, key=lambda tr: _finite(tr["final_loss"]))


def grid_seconds(trials: list[dict], best: dict, pre_run: dict | None) -> float | None:
    """The grid's seconds to the target (the module docstring's definition), or ``None``
    when no run reached it."""
    if best["seconds_to_target"] is None:
        return None
    if pre_run is not None and "pre_run_seconds" in pre_run:
        return sum(pre_run["pre_run_seconds"].values()) + best["seconds_to_target"]
    return sum(tr["counted_seconds"] for tr in trials)


def _method_row(name: str, runs: list[Contender], goal: float | None, grids: dict) -> dict:
    tuned = name in LR_GRIDS
    row: dict = {"contender": name, "lr": None, "error": None, "tuned": tuned, "runs": len(runs)}
    if all(c.error is not None for c in runs):  # listed with the reason, as it failed
        row["error"] = runs[0].error
        return row
    trials = [_trial(c, goal) for c in runs]  # a failed run still counts in the grid's time
    best = _best_trial(trials)
    row.update(
        lr=best["lr"],
        steps_to_target=best["steps_to_target"],
        seconds_to_target=best["seconds_to_target"],
        grid_seconds=grid_seconds(trials, best, grids.get(name)),
        final_loss=best["final_loss"],
        step_ms=best["step_ms"],
        skipped_steps=best["skipped_steps"],
        curve=best["curve"],
        trials=trials if tuned else None,
    )
    if tuned and name not in grids:  # --grid full: each grid point's outcome
        grids[name] = {
            "chosen": best["lr"],
            "final_loss": {tr["lr"]: tr["final_loss"] for tr in trials},
            "seconds_to_target": {tr["lr"]: tr["seconds_to_target"] for tr in trials},
        }
    return row


def _relate(rows: list[dict], best_adam: str | None) -> None:
    """Every row's times against the best Adam's and its step time against SGD's."""
    ran = {row["contender"]: row for row in rows if "curve" in row}
    adam, sgd = ran.get(best_adam or ""), ran.get("sgd")
    for row in ran.values():
        row["time_ratio_to_adam"] = _ratio(
            row["seconds_to_target"], adam and adam["seconds_to_target"]
        )
        row["step_ratio_to_adam"] = _ratio(row["steps_to_target"], adam and adam["steps_to_target"])
        row["grid_ratio_to_adam"] = _ratio(row["grid_seconds"], adam and adam["grid_seconds"])
        row["loss_at_adam_time"] = (
            None if adam is None else _loss_at(row["curve"], adam["curve"][-1][1])
        )
        row["step_ratio_to_sgd"] = _ratio(row["step_ms"], sgd and sgd["step_ms"])


def summarise(task: Task, contenders: list[Contender], grids: dict) -> dict:
    target, best_adam, reachable = find_target(contenders)
    goal = target if reachable else None
    methods: dict[str, list[Contender]] = {}
    for c in contenders:
        methods.setdefault(c.name, []).append(c)
    rows = [_method_row(name, runs, goal, grids) for name, runs in methods.items()]
    _relate(rows, best_adam)
    adam = next((row for row in rows if row["contender"] == best_adam and "curve" in row), None)
    return {
        "task": task.name,
        "target": target,
        "target_reachable": reachable,
        "initial_loss": contenders[0].curve[0][2] if contenders else None,
        "steps": max((c.curve[-1][0] for c in contenders), default=0),
        "best_adam": best_adam,
        "adam_seconds": None if adam is None else adam["seconds_to_target"],
        "adam_grid_seconds": None if adam is None else adam["grid_seconds"],
        "adam_total_seconds": None if adam is None else adam["curve"][-1][1],
        "lr_grids": grids,
        "rows": rows,
    }


# ------------------------------------------------------------------------------ reporting
HEADER = (
    "task", "contender", "lr", "runs", "steps to target", "seconds to target (best run)",
    "× best Adam (time)", "× best Adam (steps)", "grid seconds to target",
    "× best Adam (grid)", "loss at Adam's time", "step ms", "× SGD step",
)  # fmt: skip

CAPTION = (
    "Times are stepping seconds (evaluations excluded) until a run's first evaluation after "
    "step 0 at or below the target. Seconds to target (best run): a tuned method's best "
    "trial (its lr in the lr column), an untuned method's single run. Grid seconds to "
    "target: what the tuning cost, Σ over a tuned method's grid (runs) of the seconds each "
    "trial stepped until it reached the target, or of its whole run if it never did; with "
    "--grid pre-run, the pre-runs' seconds plus the chosen run's; an untuned method's "
    "single run. × best Adam: against the Adam or AdamW that set the target."
)


def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _time(value, spec: str) -> str:
    return "not reached" if value is None else format(value, spec)


def _cells(task: str, row: dict) -> list[str]:
    if row["error"] is not None:
        return [task, row["contender"], "", "", row["error"]] + [""] * (len(HEADER) - 5)
    return [
        task, row["contender"], _fmt(row["lr"], "g"), str(row["runs"]),
        _time(row["steps_to_target"], "d"), _time(row["seconds_to_target"], ".2f"),
        _fmt(row["time_ratio_to_adam"], ".2f"), _fmt(row["step_ratio_to_adam"], ".2f"),
        _time(row["grid_seconds"], ".2f"), _fmt(row["grid_ratio_to_adam"], ".2f"),
        _fmt(row["loss_at_adam_time"], ".4f"), _fmt(row["step_ms"], ".1f"),
        _fmt(row["step_ratio_to_sgd"], ".2f"),
    ]  # fmt: skip


def _unreached_note(r: dict) -> str | None:
    """A line for a task where no contender reached the target, saying why."""
    if any(row.get("seconds_to_target") is not None for row in r["rows"]):
        return None
    ended = "no Adam or AdamW run finished" if r["target"] is None else (
        f"the best tuned Adam/AdamW ended at {r['target']:.4f} against an initial "
        f"{r['initial_loss']:.4f}"
    )  # fmt: skip
    return (
        f"{r['task']}: no contender reached the target within the budget ({r['steps']} "
        f"steps): {ended}; raise --budget."
    )


def _target_text(r: dict) -> str:
    if r["target"] is None:
        return f"{r['task']}: none"
    return f"{r['task']}: {r['target']:.4f} ({r['best_adam']})"


def markdown(results: list[dict]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "| --- | --- |" + " ---: |" * (len(HEADER) - 2)]
    for r in results:
        lines += ["| " + " | ".join(_cells(r["task"], row)) + " |" for row in r["rows"]]
    notes = [note for r in results if (note := _unreached_note(r)) is not None]
    targets = "; ".join(_target_text(r) for r in results)
    skipped = [
        f"{r['task']} {row['contender']}: " + ", ".join(f"{n} × {k}" for k, n in counts.items())
        for r in results
        for row in r["rows"]
        if (counts := row.get("skipped_steps"))
    ]
    return (
        "\n".join(lines)
        + "".join(f"\n\n{note}" for note in notes)
        + f"\n\nTargets (best tuned Adam/AdamW final training loss): {targets}"
        + f"\n\n{CAPTION}"
        + f"\n\nSkipped or rejected CurveBall steps: {'; '.join(skipped) or 'none'}"
    )


LEARNING_RATE_FREE = ("prodigy", "dadapt-adam", "schedulefree-adamw", "dog", "mechanic")
"""The peers that, like CurveBall, claim to need no learning rate."""


def _seconds(rows: dict, name: str, key: str = "seconds_to_target") -> float | None:
    row = rows.get(name)
    return None if row is None or row["error"] is not None else row[key]


def summary(results: list[dict]) -> str:
    """Per task, CurveBall's seconds to the target beside the fastest learning-rate-free
    peer's and the best Adam's, both as its best single trial and as its whole grid."""
    lines = [
        "| task | CurveBall (s) | fastest learning-rate-free peer (s) | best Adam, best trial "
        "(s) | best Adam, whole grid (s) | CurveBall / best trial | CurveBall / grid |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        rows = {row["contender"]: row for row in r["rows"]}
        ours = _seconds(rows, "curveball")
        peers = [(s, n) for n in LEARNING_RATE_FREE if (s := _seconds(rows, n)) is not None]
        peer = "none reached it" if not peers else "{1} ({0:.2f})".format(*min(peers))
        trial, grid = r["adam_seconds"], r["adam_grid_seconds"]
        lines.append(
            f"| {r['task']} | {_time(ours, '.2f')} | {peer} | {_time(trial, '.2f')} | "
            f"{_time(grid, '.2f')} | {_fmt(_ratio(ours, trial), '.2f')} | "
            f"{_fmt(_ratio(ours, grid), '.2f')} |"
        )
    return "\n".join(lines)


def _plot_curves(axes, r: dict) -> list[float]:
    """Loss against seconds and steps: each method's best run, its other trials faint."""
    drawn = []
    for row in r["rows"]:
        if row["error"] is not None:
            continue
        width = 2.0 if row["contender"].startswith("curveball") else 1.0
        steps, seconds, losses = zip(*row["curve"], strict=True)
        color = axes[0].plot(seconds, losses, label=row["contender"], lw=width)[0].get_color()
        axes[1].plot(steps, losses, label=row["contender"], lw=width, color=color)
        drawn += losses
        for trial in row["trials"] or []:
            if trial["lr"] == row["lr"] or len(trial["curve"]) < 2:
                continue
            steps, seconds, losses = zip(*trial["curve"], strict=True)
            axes[0].plot(seconds, losses, lw=0.6, alpha=0.35, color=color)
            axes[1].plot(steps, losses, lw=0.6, alpha=0.35, color=color)
    return drawn


def _plot_times(ax, r: dict) -> None:
    """The two times to the target as bars: the best run's and the grid's."""
    from matplotlib.patches import Patch

    rows = [row for row in r["rows"] if row["error"] is None]
    for i, row in enumerate(rows):
        for offset, key, color in ((-0.2, "seconds_to_target", "C0"), (0.2, "grid_seconds", "C1")):
            if row[key] is None:
                ax.text(0, i + offset, " not reached", va="center", fontsize=6)
            else:
                ax.barh(i + offset, row[key], height=0.4, color=color)
    ax.set_yticks(range(len(rows)), [row["contender"] for row in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("stepping seconds to the target")
    best = Patch(color="C0", label="best run (tuned: its best trial)")
    grid = Patch(color="C1", label="whole grid (untuned: its one run)")
    ax.legend(handles=[best, grid], fontsize=7)


def plot(results: list[dict], folder: str) -> None:
    plt = plots.pyplot()
    for r in results:
        fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
        drawn = [v for v in _plot_curves(axes[:2], r) if math.isfinite(v) and v > 0]
        for ax, xlabel in zip(axes[:2], ("stepping time (s)", "steps"), strict=True):
            if r["target"] is not None:
                ax.axhline(r["target"], color="k", ls=":", lw=0.8)
            plots.log_axes(ax, xlabel, "training loss (whole training set)")
            if drawn:
                ax.set_ylim(min(drawn) / 1.5, max(r["initial_loss"], min(drawn)) * 1.5)
        axes[1].legend(fontsize=7)
        _plot_times(axes[2], r)
        fig.suptitle(f"{r['task']} (dotted: the best tuned Adam's final loss, the target)")
        plots.save(fig, folder, r["task"])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    p.add_argument("--budget", type=int, default=400, help="steps per contender")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="samples per step on every task (default: each task's own, 128 images or 32 "
        "text windows)",
    )
    p.add_argument(
        "--grid",
        choices=("full", "pre-run"),
        default="full",
        help="tuned methods: race every grid point as a trial (full), or only the one a "
        "short pre-run picks (pre-run, faster)",
    )
    p.add_argument("--pre-steps", type=int, default=None, help="learning-rate pre-run steps")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--data-dir", default=os.environ.get("CURVEBALL_DATA", "../shared/data"))
    p.add_argument("--text-chars", type=int, default=300_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None, help="write the tables to this file")
    p.add_argument("--plots", default=None)
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.pre_steps is None:
        args.pre_steps = max(1, args.budget // 4)
    for option in ("batch_size", "budget", "eval_every", "pre_steps"):
        value = getattr(args, option)
        if value is not None and value < 1:
            p.error(f"--{option.replace('_', '-')}: expected a positive integer, got {value}")
    if not set(TARGET_METHODS) & set(args.contenders):
        p.error("--contenders must include adam or adamw (the target)")
    return args


def run(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in args.tasks:
            task = TASKS[name]
            if args.batch_size is not None:
                task = replace(task, batch_size=args.batch_size)
            x, t = load_data(task, args.data_dir, args.text_chars)
            results.append(race_task(task, args, x, t))
            print(markdown([results[-1]]).split("\n\nTargets")[0], flush=True)
    print(markdown(results))
    common.write_markdown(
        args.markdown,
        f"### summary\n\n{summary(results)}\n\n### every contender\n\n{markdown(results)}",
    )
    common.write_json(args.json, {"settings": vars(args), "results": results})
    if args.plots:
        plot(results, args.plots)
    return results


if __name__ == "__main__":
    run()
