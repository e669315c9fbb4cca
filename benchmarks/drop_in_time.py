"""Step time of the forward-mode rules that make attention and recurrent layers drop-in.

Two workloads (float32, CPU or CUDA), each timed interleaved (one step of each
contender per round, medians after warm-up):

* ``transformer``: a 2-layer ``nn.TransformerEncoder`` (width 64, 4 heads, 64
  tokens, batch 16) classifying every token. ``curveball`` uses the closed-form
  attention tangent; ``curveball-math-sdpa`` instead runs PyTorch's math backend of
  ``F.scaled_dot_product_attention`` under its own forward-mode formulas;
  ``curveball-mha-explicit`` runs ``nn.MultiheadAttention`` on PyTorch's explicit
  path (``need_weights=True``) instead of rebuilding it from the calls the lean
  rules handle, as releases before that rule did; ``adam`` is one Adam step.
* ``lstm`` and ``gru``: a character-level language model (embedding 32, an LSTM
  or GRU of 128 hidden units, 64 characters, batch 16). ``curveball`` uses the
  recurrent layers' rule (the layer's own kernel for the primal values, a lean
  tangent recurrence, replay); ``curveball-native`` instead runs the native
  kernel on dual numbers under PyTorch's own forward-mode formulas (oneDNN off
  during the passes); ``curveball-double-backward`` is the fallback path;
  ``adam`` is one Adam step.

Example::

    python -m benchmarks.drop_in_time --repeats 20
"""

from __future__ import annotations

import argparse
import copy
import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks import common
from benchmarks.common import CharLSTM
from benchmarks.step_time import Contender, time_interleaved
from curveball import CurveBall
from curveball._curvature import lean_rules


class TokenClassifier(nn.Module):
    def __init__(self, width: int = 64, classes: int = 10) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.encoder(x)).flatten(0, 1)


def workload(name: str, device: torch.device):
    torch.manual_seed(0)
    if name == "transformer":
        model = TokenClassifier().to(device)
        x = torch.randn(16, 64, 64, device=device)
        t = torch.randint(0, 10, (16 * 64,), device=device)
    else:
        model = CharLSTM(recurrent=nn.GRU if name == "gru" else nn.LSTM).to(device)
        x = torch.randint(0, 64, (16, 64), device=device)
        t = torch.randint(0, 64, (16 * 64,), device=device)
    return model, x, t


@contextmanager
def _patched(owner: object, name: str, value: object) -> Iterator[None]:
    """``owner.name`` is ``value`` inside the block, as it was after it."""
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def _rule_off(method: str):
    """``LeanTangents.<method>`` declines every call, so PyTorch's own formulas run."""
    return _patched(lean_rules.LeanTangents, method, lambda self, *args: None)


@contextmanager
def _without_attention_rule() -> Iterator[None]:
    """The attention rule off, and SDPA on its math backend."""
    with _rule_off("_attention"), sdpa_kernel(SDPBackend.MATH):
        yield


def _explicit_multi_head_attention():
    """``nn.MultiheadAttention`` not rebuilt: PyTorch's explicit path, whose inside the
    lean rules do not see (so neither its projections nor its attention replay)."""
    return _patched(lean_rules.multi_head_rule, "supported", lambda call: False)


def _without_recurrent_rule():
    """The recurrent layers' rule off: native kernels on dual numbers."""
    return _rule_off("_recurrent")


def contender(method: str, model: nn.Module, x, t) -> Contender:
    model = copy.deepcopy(model)
    if method == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def adam_step() -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), t).backward()
            opt.step()

        return Contender(method, adam_step)
    mode = "double-backward" if method == "curveball-double-backward" else "forward"
    opt = CurveBall(model, forward_mode=mode)
    scope: Callable[[], object] = nullcontext
    if method.endswith("math-sdpa"):
        scope = _without_attention_rule
    elif method.endswith("native"):
        scope = _without_recurrent_rule
    elif method.endswith("mha-explicit"):
        scope = _explicit_multi_head_attention

    def curveball_step() -> None:
        with scope():
            opt.step(lambda: model(x), lambda y: F.cross_entropy(y, t))

    return Contender(method, curveball_step)


METHODS = {
    "transformer": ("curveball", "curveball-math-sdpa", "curveball-mha-explicit", "adam"),
    "lstm": ("curveball", "curveball-native", "curveball-double-backward", "adam"),
    "gru": ("curveball", "curveball-native", "curveball-double-backward", "adam"),
}


def run(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None, help="write the table to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for name in args.workloads:
        model, x, t = workload(name, device)
        contenders = [contender(m, model, x, t) for m in METHODS[name]]
        time_interleaved(contenders, device, args.warmup, args.repeats)
        medians = {c.method: statistics.median(c.times) for c in contenders}
        for method, seconds in medians.items():
            rows.append(
                {
                    "workload": name,
                    "method": method,
                    "median_ms": 1e3 * seconds,
                    "x_curveball": seconds / medians["curveball"],
                    "x_adam": seconds / medians["adam"],
                }
            )
    lines = ["| workload | method | step ms (median) | × curveball | × adam |",
             "| --- | --- | ---: | ---: | ---: |"]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['method']} | {r['median_ms']:.1f} | {r['x_curveball']:.2f} "
            f"| {r['x_adam']:.2f} |"
        )
    print("\n".join(lines))
    common.write_markdown(args.markdown, "\n".join(lines))
    common.write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    run()
