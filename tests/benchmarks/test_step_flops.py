"""The FLOP counts of the step benchmark, against closed forms: an MLP, an LSTM, attention."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import common, race, step_flops


def test_an_mlp_step_counts_what_its_passes_multiply():
    b, widths = 8, (784, 16, 10)
    task = race.Task("tiny-mlp", lambda: common.mlp(widths), "mnist", batch_size=b)
    row = step_flops.count_task(task, ["curveball", "curveball-minibatch"])
    every = sum(i * o for i, o in zip(widths[:-1], widths[1:], strict=True))  # Σ in·out
    hidden = widths[1] * widths[2]  # the layers whose input depends on the parameters
    forward = 2 * b * every
    adam = forward + 2 * b * (every + hidden)  # backward: into the weights and the inputs
    # CurveBall: the forward pass plus its tangent (Ẇx for every layer, Wẋ for the hidden
    # ones), a backward pass, the tangent J d once more, and a test's forward every 5th step
    curveball = forward + 3 * 2 * b * (every + hidden) + forward / 5
    assert row["adam_flops"] == adam
    assert row["ratio"]["curveball"] == pytest.approx(curveball / adam, rel=1e-4)
    # a curvature mini-batch of r = ⌈n/4⌉ rows: J d is a fresh pass (primal and tangent)
    # on those rows only
    r = math.ceil(b * race.CURVEBALL_OPTIONS["curveball-minibatch"]["curvature_fraction"])
    minibatch = curveball - 2 * b * (every + hidden) + 2 * r * every + 2 * r * (every + hidden)
    assert row["ratio"]["curveball-minibatch"] == pytest.approx(minibatch / adam, rel=1e-4)


def test_the_fused_lstm_kernel_is_counted():
    b, seq, vocab, hidden, embedding = 4, 6, 11, 128, 32
    model = common.CharLSTM(vocab)
    tokens = torch.randint(0, vocab, (b, seq))
    with FlopCounterMode(display=False, custom_mapping=step_flops.CPU_KERNELS) as counter:
        F.cross_entropy(model(tokens), tokens.reshape(-1)).backward()
    gates = 2 * b * seq * 4 * hidden * (embedding + hidden)  # W_ih x_t + W_hh h_{t-1}
    head = 2 * b * seq * hidden * vocab
    assert counter.get_total_flops() == 3 * gates + 3 * head  # forward, then twice in backward


def test_cpu_attention_is_counted():
    b, heads, length, width = 2, 3, 5, 4
    q, k, v = (torch.randn(b, heads, length, width, requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False, custom_mapping=step_flops.CPU_KERNELS) as counter:
        out = F.scaled_dot_product_attention(q, k, v)
    forward = 2 * 2 * b * heads * length * length * width  # Q Kᵀ, then the weights times V
    assert counter.get_total_flops() == forward
    with FlopCounterMode(display=False, custom_mapping=step_flops.CPU_KERNELS) as counter:
        out.sum().backward()
    # the four products of the gradients (dV, dP, dQ, dK), and the scores recomputed or not
    assert 2 * forward <= counter.get_total_flops() <= 2.5 * forward


def test_the_table_sets_the_race_beside_the_count(tmp_path, capsys):
    rows = [
        {"contender": "curveball", "step_ms": 10.0, "step_ratio_to_adam": 0.5},
        {"contender": "adamw", "step_ms": 4.0, "step_ratio_to_adam": 1.0},
    ]
    results = {"results": [{"task": "mnist-mlp", "best_adam": "adamw", "rows": rows}]}
    path = tmp_path / "race.json"
    path.write_text(json.dumps(results))
    (row,) = step_flops.run(
        ["--tasks", "mnist-mlp", "--contenders", "curveball", "--race", str(path)]
    )
    line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("| mnist-mlp"))
    ratio = row["ratio"]["curveball"]
    assert line == f"| mnist-mlp | 0.059 | {ratio:.2f} | {1 / ratio:.2f} | 2.50 | 0.50 |"
    assert step_flops.measured(results, "char-lstm", "curveball") == (None, None)
