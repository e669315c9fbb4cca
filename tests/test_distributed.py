"""Data-parallel CurveBall on two CPU processes (``gloo``).

One spawn of two worker processes runs every scenario (spawning is the slow part);
each worker records what it saw into a result file and the tests below check it:

* equivalence: 2 processes x 32 samples take the same steps as 1 process x 64
  samples (losses, parameters, z and λ), in float64 and float32, over 12 steps
  that include the trust-region tests at steps 5 and 10;
* after every step all processes hold bit-identical parameters, z and λ;
* batch norm: per-process batch statistics; the trained state stays identical and
  every process's running statistics are those of one forward pass on its shard;
* a non-finite input on one process makes every process skip that step together;
* a ``DistributedDataParallel`` wrapper is refused.
"""

from __future__ import annotations

import copy
import datetime
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from curveball import CurveBall

WORLD = 2
PER_RANK = 32
STEPS = 12
NAN_STEP = 3
IN, OUT = 6, 3
pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed/gloo"
)
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.complex128: 1e-10}
ATOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.complex128: 1e-12}


# --------------------------------------------------------------------------- shared set-up
class ComplexFirst(nn.Module):
    """``Re(W (x + i sin x))`` with a complex weight ``W``: a complex parameter to average."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(16, IN, dtype=torch.cdouble) / IN**0.5)

    def forward(self, x):
        return torch.real(torch.complex(x, torch.sin(x)) @ self.weight.T)


def make_model(dtype: torch.dtype, batch_norm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    if dtype.is_complex:
        first: nn.Module = ComplexFirst()
        dtype = torch.float64
    else:
        first = nn.Linear(IN, 16)
    layers: list[nn.Module] = [first]
    if batch_norm:
        layers.append(nn.BatchNorm1d(16))
    layers += [nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, OUT)]
    return nn.Sequential(*layers)._apply(lambda t: t if t.is_complex() else t.to(dtype))


def global_batch(step: int, dtype: torch.dtype, nan_rank: int | None = None):
    """The 64-sample batch of ``step`` (1-based); optionally poisons one rank's shard."""
    gen = torch.Generator().manual_seed(1000 + step)
    dtype = torch.float64 if dtype.is_complex else dtype
    x = torch.randn(WORLD * PER_RANK, IN, generator=gen, dtype=torch.float64).to(dtype)
    t = torch.randint(0, OUT, (WORLD * PER_RANK,), generator=gen)
    if nan_rank is not None and step == NAN_STEP:
        x[nan_rank * PER_RANK + 5, 2] = float("nan")
    return x, t


def shard(tensor: torch.Tensor, rank: int) -> torch.Tensor:
    return tensor[rank * PER_RANK : (rank + 1) * PER_RANK]


def snapshot(model: nn.Module, optimizer: CurveBall) -> dict:
    params = [p.detach().clone() for p in model.parameters()]
    zs = [optimizer.state[p]["z"].detach().clone() for p in model.parameters()]
    info = optimizer.last
    return {
        "params": params,
        "z": zs,
        "lambd": optimizer.lambd,
        "loss": info.loss,
        "skipped": info.skipped,
        "trust_ratio": info.trust_ratio,
        "buffers": {k: v.clone() for k, v in model.named_buffers()},
    }


# scenarios checked against one process: name -> (dtype, CurveBall options)
EQUIVALENCE = {
    "float64": (torch.float64, {}),
    "float32": (torch.float32, {}),
    "options": (torch.float64, {"weight_decay": 1e-2, "step_size_interval": 3}),
    "double_backward": (torch.float64, {"forward_mode": "double-backward"}),
    "complex": (torch.complex128, {}),  # a complex parameter: averaged as its real pairs
}


def train(
    dtype: torch.dtype,
    rank: int | None,
    nan_rank: int | None = None,
    batch_norm: bool = False,
    options: dict | None = None,
):
    """Run STEPS CurveBall steps; ``rank=None`` means one process with the whole batch.

    Returns one snapshot per step; in a distributed run also a flag per step telling
    whether all processes held bit-identical parameters, z and λ after it, and, with
    batch norm, whether the running statistics were those of one forward pass.
    """
    model = make_model(dtype, batch_norm)
    optimizer = CurveBall(model, **(options or {}))
    history, identical, running_ok = [], [], []
    for step in range(1, STEPS + 1):
        x, t = global_batch(step, dtype, nan_rank)
        if rank is not None:
            x, t = shard(x, rank), shard(t, rank)
        expected = None
        if batch_norm:
            reference = copy.deepcopy(model).train()
            with torch.no_grad():
                reference(x)
            expected = dict(reference.named_buffers())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            optimizer.step(lambda x=x: model(x), lambda y, t=t: F.cross_entropy(y, t))
        state = snapshot(model, optimizer)
        state["warned"] = any("skipped" in str(w.message) for w in caught)
        history.append(state)
        if expected is not None:
            running_ok.append(all(torch.equal(state["buffers"][k], v) for k, v in expected.items()))
        if rank is not None:
            identical.append(all_ranks_equal(state))
    return {"history": history, "identical": identical, "running_ok": running_ok}


def all_ranks_equal(state: dict) -> bool:
    """Gather parameters, z and λ from every process and compare them bit for bit."""
    flat = torch.cat(
        [
            torch.view_as_real(t).reshape(-1) if t.is_complex() else t.reshape(-1).to(torch.float64)
            for t in state["params"] + state["z"]
        ]  # fmt: skip
        + [torch.tensor([state["lambd"]], dtype=torch.float64)]
    )
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def ddp_refusals() -> list[str]:
    model = make_model(torch.float64)
    wrapped = nn.parallel.DistributedDataParallel(model)
    messages = []
    for build in (lambda: CurveBall(wrapped), lambda: CurveBall(model.parameters(), model=wrapped)):
        try:
            build()
        except TypeError as error:
            messages.append(str(error))
        else:
            messages.append("")
    return messages


def worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        results = {
            name: train(dtype, rank, options=opts) for name, (dtype, opts) in EQUIVALENCE.items()
        }
        results |= {
            "batch_norm": train(torch.float64, rank, batch_norm=True),
            "nan": train(torch.float64, rank, nan_rank=1),
            "batch_norm_nan": train(torch.float64, rank, nan_rank=1, batch_norm=True),
            "ddp": ddp_refusals(),
        }
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- the run
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.spawn(worker, args=(str(root / "init"), str(root)), nprocs=WORLD, join=True)
    return [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _single(dtype: torch.dtype, nan_rank: int | None = None, options=None) -> list[dict]:
    """The same training in this process, on the whole batch (no process group)."""
    assert not dist.is_initialized()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only contend
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return train(dtype, None, nan_rank=nan_rank, options=options)["history"]
    finally:
        torch.set_num_threads(threads)


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(a, b, rtol=RTOL[dtype], atol=ATOL[dtype])


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", list(EQUIVALENCE))
def test_two_processes_match_one_process_with_the_whole_batch(runs, name):
    dtype, options = EQUIVALENCE[name]
    reference = _single(dtype, options=options)
    for rank in range(WORLD):
        history = runs[rank][name]["history"]
        assert len(history) == STEPS
        for step, (got, want) in enumerate(zip(history, reference, strict=True), start=1):
            assert not got["skipped"]
            assert got["loss"] == pytest.approx(want["loss"], rel=RTOL[dtype])
            assert got["lambd"] == pytest.approx(want["lambd"], rel=RTOL[dtype])
            for a, b in zip(got["params"] + got["z"], want["params"] + want["z"], strict=True):
                _close(a, b, dtype)
            tested = step % 5 == 0
            assert (got["trust_ratio"] is not None) == tested
            if tested:
                assert got["trust_ratio"] == pytest.approx(
                    want["trust_ratio"], rel=1e3 * RTOL[dtype]
                )
    # the damping rule did act (λ moved away from its initial value) in the reference
    assert reference[-1]["lambd"] != 1.0


@pytest.mark.parametrize("scenario", [*EQUIVALENCE, "batch_norm", "nan", "batch_norm_nan"])
def test_all_processes_hold_identical_state_after_every_step(runs, scenario):
    for rank in range(WORLD):
        assert runs[rank][scenario]["identical"] == [True] * STEPS
    for a, b in zip(runs[0][scenario]["history"], runs[1][scenario]["history"], strict=True):
        for x, y in zip(a["params"] + a["z"], b["params"] + b["z"], strict=True):
            assert torch.equal(x, y)
        assert a["lambd"] == b["lambd"]
        assert a["skipped"] == b["skipped"]


def test_batch_norm_uses_per_process_batch_statistics(runs):
    histories = [runs[rank]["batch_norm"]["history"] for rank in range(WORLD)]
    for rank in range(WORLD):
        # running statistics: exactly one ordinary forward pass on the own shard per step
        assert runs[rank]["batch_norm"]["running_ok"] == [True] * STEPS
        assert histories[rank][-1]["buffers"]["1.num_batches_tracked"].item() == STEPS
        assert not any(state["skipped"] for state in histories[rank])
    # ... which differ between processes (there is no synchronisation of batch statistics)
    last = [h[-1]["buffers"]["1.running_mean"] for h in histories]
    assert not torch.allclose(last[0], last[1])
    # while the trained state stays identical (checked bit for bit above) and moves
    first = histories[0][0]["params"][0]
    assert not torch.equal(first, histories[0][-1]["params"][0])


def test_non_finite_value_on_one_process_skips_the_step_everywhere(runs):
    reference = _single(torch.float64, nan_rank=1)
    for rank in range(WORLD):
        history = runs[rank]["nan"]["history"]
        skipped = [state["skipped"] for state in history]
        assert skipped == [step == NAN_STEP for step in range(1, STEPS + 1)]
        assert [state["warned"] for state in history] == skipped
        before, at = history[NAN_STEP - 2], history[NAN_STEP - 1]
        for a, b in zip(before["params"] + before["z"], at["params"] + at["z"], strict=True):
            assert torch.equal(a, b)
        assert at["lambd"] > before["lambd"]  # the skip raises the damping
        # training goes on, the same as one process seeing the whole poisoned batch
        assert reference[NAN_STEP - 1]["skipped"]
        for got, want in zip(history[NAN_STEP:], reference[NAN_STEP:], strict=True):
            assert not got["skipped"]
            assert got["lambd"] == pytest.approx(want["lambd"], rel=1e-10)
            for a, b in zip(got["params"] + got["z"], want["params"] + want["z"], strict=True):
                _close(a, b, torch.float64)
        assert not torch.equal(history[-1]["params"][0], at["params"][0])


def test_distributed_data_parallel_wrapper_is_refused(runs):
    for rank in range(WORLD):
        for message in runs[rank]["ddp"]:
            assert ".module" in message


def test_skipped_step_leaves_batch_norm_statistics_untouched(runs):
    for rank in range(WORLD):
        run = runs[rank]["batch_norm_nan"]
        history = run["history"]
        assert [state["skipped"] for state in history] == [
            step == NAN_STEP for step in range(1, STEPS + 1)
        ]
        before, at = history[NAN_STEP - 2]["buffers"], history[NAN_STEP - 1]["buffers"]
        for name, value in before.items():
            assert torch.equal(value, at[name]), name
        # every other step updated them as one forward pass on the shard would
        assert [ok for step, ok in enumerate(run["running_ok"], 1) if step != NAN_STEP] == [
            True
        ] * (STEPS - 1)
        assert history[-1]["buffers"]["1.num_batches_tracked"].item() == STEPS - 1
