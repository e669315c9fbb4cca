"""A prepared GPU check: CurveBall's step time and memory on GPU-sized models, and a short race.

One command, sized to finish within ``--max-minutes`` (8) on one NVIDIA GPU::

    python -m benchmarks.gpu_check --json out/gpu_check.json
    PYTHONPATH=src python -m benchmarks.gpu_check ...   # where the project is not installed

It measures, per model, contender and precision, the median step time over
``--repeats`` steps after ``--warmup`` untimed ones (``torch.cuda.synchronize``
around every timed step) and the peak memory (``torch.cuda.max_memory_allocated``,
its statistics reset before each contender's model is built, so the peak covers the
weights, the optimizer's state, the batch and the activations; ``None`` on the CPU).
A contender that fails (out of memory, an operator without a forward-mode formula) gets
an error entry and the rest runs; an entry stops repeating after ``--entry-seconds`` and
says how many steps it timed.

Models (each on one fixed random batch):

* ``resnet18``: ``benchmarks.common.resnet18`` at CIFAR size, batch 128 of 3×32×32, 10 classes;
* ``gpt2-small``: a GPT-2-small-sized decoder (``Decoder``): 12 pre-norm blocks
  (``nn.TransformerEncoderLayer``, ``norm_first``, GELU, a causal mask), width 768, 12 heads,
  sequence 512, the GPT-2 vocabulary of 50,257 tokens with an untied head (163M
  parameters), batch 8;
* ``vit-s``: ViT-S/16 (``ViT``): patch 16, width 384, 6 heads, 12 layers, 224×224 images,
  1,000 classes, batch 64.

Contenders: ``sgd`` (momentum 0.9), ``adam``, ``curveball`` (``CurveBall(model)``, its
forward-mode engine, ``opt.step(model_fn, loss_fn)`` with ``curveball.losses.cross_entropy``)
and ``curveball-double-backward`` (``forward_mode="double-backward"``, its forward passes
on PyTorch's composite attention: the fused attention kernels have no double backward);
CurveBall's entries name the engine that ran. Precisions: ``fp32`` and ``bf16``
(``torch.autocast(device_type, dtype=torch.bfloat16)`` around the forward pass: around
``model_fn`` for CurveBall).

Then a race on the decoder (``--race-seconds``, 180): CurveBall at its defaults against Adam
(lr 6e-4, the GPT-3 paper's for its 125M model), from the same initial weights on the same
batches, in lockstep, each until its own stepping time reaches half the race; the loss on
held-out windows is measured (untimed) at 20 evenly spaced points of each one's time.
The text is the Python standard library's sources, read as ``benchmarks.race`` reads them,
as UTF-8 bytes (so the race's decoder has a 256-token vocabulary; its body is the timing
decoder's), in windows of the sequence length, the last 5 % held out.

``--device cpu --quick`` runs all of it on tiny versions of the models in seconds (the test's
way); ``--json PATH`` writes every number.
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks import common, race
from curveball import CurveBall, losses

CONTENDERS = ("sgd", "adam", "curveball", "curveball-double-backward")
PRECISIONS = ("fp32", "bf16")
RACE_CONTENDERS = ("curveball", "adam")
RACE_EVALUATIONS = 20
ADAM_LR = 6e-4


# ------------------------------------------------------------------------------ the models
class Decoder(nn.Module):
    """A GPT-2-style decoder from ``torch.nn``: token and learned position embeddings,
    pre-norm blocks (``nn.TransformerEncoderLayer`` with ``norm_first``, GELU, no dropout)
    under a causal mask, a final LayerNorm and an untied head; next-token logits for every
    position, flattened into rows."""

    def __init__(self, vocab: int, seq: int, width: int, heads: int, layers: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, width)
        self.position = nn.Parameter(0.02 * torch.randn(seq, width))
        block = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True,
            norm_first=True,
        )  # fmt: skip
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        causal = nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device)
        h = self.embedding(tokens) + self.position[:length]
        h = self.blocks(h, mask=causal, is_causal=True)
        return self.head(self.norm(h)).flatten(0, 1)


class ViT(nn.Module):
    """A Vision Transformer (Dosovitskiy et al., arXiv:2010.11929): a patch convolution, a
    class token, learned positions, pre-norm blocks (GELU, no dropout), a final LayerNorm and
    a linear head on the class token."""

    def __init__(
        self, image: int, patch: int, width: int, heads: int, layers: int, classes: int
    ) -> None:
        super().__init__()
        self.patches = nn.Conv2d(3, width, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.position = nn.Parameter(0.02 * torch.randn(1, (image // patch) ** 2 + 1, width))
        block = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True,
            norm_first=True,
        )  # fmt: skip
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = self.patches(images).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls.expand(len(h), -1, -1), h], dim=1) + self.position
        return self.head(self.norm(self.blocks(h))[:, 0])


def tiny_resnet(classes: int = 10) -> nn.Module:
    """The quick check's ResNet: a 3×3 stem of 8 channels and two residual blocks (8, 16)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        common._Residual(8, 8, 1), common._Residual(8, 16, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes),
    )  # fmt: skip


@dataclass(frozen=True)
class Workload:
    """A model and the shape of its fixed batch: images ``(3, size, size)`` with ``classes``
    labels, or ``seq`` tokens out of ``classes`` (the vocabulary) with a label at each."""

    name: str
    build: Callable[[], nn.Module]
    batch_size: int
    classes: int
    size: int = 0  # images: the side; 0 for tokens
    seq: int = 0  # tokens: the sequence length

    def batch(self, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        if self.seq:
            shape = (self.batch_size, self.seq)
            tokens = torch.randint(0, self.classes, shape, generator=g)
            return tokens, torch.randint(0, self.classes, shape, generator=g).reshape(-1)
        x = torch.randn(self.batch_size, 3, self.size, self.size, generator=g)
        return x, torch.randint(0, self.classes, (self.batch_size,), generator=g)


@dataclass(frozen=True)
class DecoderShape:
    width: int
    heads: int
    layers: int
    seq: int
    batch_size: int


FULL_DECODER = DecoderShape(768, 12, 12, 512, 8)
QUICK_DECODER = DecoderShape(32, 2, 2, 16, 2)


def workloads(quick: bool) -> list[Workload]:
    """The three models, full-sized or (``quick``) tiny."""
    d = QUICK_DECODER if quick else FULL_DECODER
    vocab = 256 if quick else 50257

    def decoder() -> nn.Module:
        return Decoder(vocab, d.seq, d.width, d.heads, d.layers)

    if quick:
        vit = Workload("vit-s", lambda: ViT(32, 16, 32, 2, 2, 10), 2, 10, size=32)
        resnet = Workload("resnet18", tiny_resnet, 2, 10, size=16)
    else:
        vit = Workload("vit-s", lambda: ViT(224, 16, 384, 6, 12, 1000), 64, 1000, size=224)
        resnet = Workload("resnet18", common.resnet18, 128, 10, size=32)
    gpt = Workload("gpt2-small", decoder, d.batch_size, vocab, seq=d.seq)
    return [resnet, gpt, vit]


# ------------------------------------------------------------------------------ the steps
def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """bf16 autocast for ``precision="bf16"``, nothing for ``"fp32"``."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def forward_context(device: torch.device, precision: str, math_attention: bool) -> ExitStack:
    """The forward pass's context: ``autocast``, and with ``math_attention`` PyTorch's
    composite attention (the fused flash and memory-efficient kernels have no double
    backward, so the double-backward engine needs it)."""
    stack = ExitStack()
    stack.enter_context(autocast(device, precision))
    if math_attention:
        stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
    return stack


Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, t) -> the loss, detached


def make_step(name: str, model: nn.Module, device: torch.device, precision: str, lr=None):
    """``(step, optimizer)`` for a contender; ``step(x, t)`` returns the loss before it."""
    if name.startswith("curveball"):
        double = name == "curveball-double-backward"
        opt = CurveBall(model, forward_mode="double-backward" if double else "auto")

        def curveball_step(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            def model_fn() -> torch.Tensor:
                with forward_context(device, precision, math_attention=double):
                    return model(x)

            return opt.step(model_fn, losses.cross_entropy(t))[0]

        return curveball_step, opt
    if name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr or 0.01, momentum=0.9)
    elif name == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr or ADAM_LR)
    else:
        raise ValueError(f"unknown contender {name!r}")

    def gradient_step(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss = F.cross_entropy(model(x), t)
        loss.backward()
        opt.step()
        return loss.detach()

    return gradient_step, opt


# ------------------------------------------------------------------------------ the timing
@dataclass(frozen=True)
class Settings:
    device: torch.device
    warmup: int
    repeats: int
    entry_seconds: float
    seed: int


def _free(device: torch.device) -> None:
    """The last contender's memory released and the peak statistics reset (CUDA only: on
    the CPU nothing is measured, and a full collection costs a second there)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def _describe(error: BaseException) -> str:
    lines = str(error).strip().splitlines() or [""]
    return f"{type(error).__name__}: {lines[0][:200]}"


def timed_steps(step: Step, x, t, s: Settings) -> tuple[list[float], float]:
    """The seconds of up to ``s.repeats`` steps after ``s.warmup`` untimed ones (fewer once
    ``s.entry_seconds`` have passed), each between two synchronizations; the last loss."""
    loss = torch.tensor(math.nan)
    for _ in range(s.warmup):
        loss = step(x, t)
    common.sync(s.device)
    times: list[float] = []
    while len(times) < s.repeats and (not times or sum(times) < s.entry_seconds):
        start = time.perf_counter()
        loss = step(x, t)
        common.sync(s.device)
        times.append(time.perf_counter() - start)
    return times, float(loss)


def blank_entry(work: Workload, name: str, precision: str, error: str | None = None) -> dict:
    """An entry of the report with nothing measured yet (``error``: why nothing will be)."""
    return {
        "model": work.name, "contender": name, "precision": precision,
        "batch_size": work.batch_size, "step_ms": None, "repeats": 0,
        "peak_memory_bytes": None, "engine": None, "loss": None, "error": error,
    }  # fmt: skip


def time_entry(work: Workload, name: str, precision: str, s: Settings) -> dict:
    """One model × contender × precision: its median step time and peak memory, or its
    error."""
    entry = blank_entry(work, name, precision)
    _free(s.device)
    try:
        torch.manual_seed(s.seed)
        model = work.build().to(s.device)
        x, t = (v.to(s.device) for v in work.batch(s.seed))
        step, opt = make_step(name, model, s.device, precision)
        times, loss = timed_steps(step, x, t, s)
        last = getattr(opt, "last", None)
        entry.update(
            step_ms=statistics.median(times) * 1e3, repeats=len(times), loss=loss,
            peak_memory_bytes=_peak(s.device), engine=None if last is None else last.engine,
        )  # fmt: skip
    except Exception as error:  # out of memory, no forward-mode formula: an entry, not a stop
        entry["error"] = _describe(error)
    finally:
        model = step = opt = x = t = None  # freed before the next entry's reset
    return entry


def time_all(works: list[Workload], s: Settings, deadline: float) -> list[dict]:
    """Every model × contender × precision, in that order; past ``deadline`` (a
    ``time.perf_counter`` reading) an entry is recorded as not run."""
    entries = []
    for work in works:
        for name in CONTENDERS:
            for precision in PRECISIONS:
                if time.perf_counter() > deadline:
                    entry = blank_entry(work, name, precision, "not run: no time left")
                else:
                    entry = time_entry(work, name, precision, s)
                print(_entry_line(entry), flush=True)
                entries.append(entry)
    return entries


def _mib(value: int | None) -> str:
    return "—" if value is None else f"{value / 2**20:.0f}"


def _entry_line(e: dict) -> str:
    if e["error"] is not None:
        return f"{e['model']} {e['contender']} {e['precision']}: {e['error']}"
    return (
        f"{e['model']} {e['contender']} {e['precision']}: {e['step_ms']:.2f} ms "
        f"(median of {e['repeats']}), peak {_mib(e['peak_memory_bytes'])} MiB"
        + (f", engine {e['engine']}" if e["engine"] else "")
    )


# ------------------------------------------------------------------------------ the race
@dataclass
class Runner:
    """One contender of the race: its model, step, stepping seconds and held-out curve."""

    name: str
    model: nn.Module
    step: Step
    seconds: float = 0.0
    steps: int = 0
    curve: list[tuple[int, float, float]] = field(default_factory=list)  # step, seconds, loss
    error: str | None = None


def byte_windows(chars: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The standard library's sources as UTF-8 bytes in windows of ``seq + 1``: the first
    95 % to train on, the rest held out."""
    data = race.stdlib_text(chars).encode("utf-8")
    codes = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    windows = codes[: len(codes) // (seq + 1) * (seq + 1)].view(-1, seq + 1)
    cut = max(1, int(0.95 * len(windows)))
    return windows[:cut], windows[cut:]


@torch.no_grad()
def held_out_loss(model: nn.Module, windows: torch.Tensor, batch_size: int, precision: str):
    """The mean next-byte cross-entropy over ``windows`` (evaluation mode, no gradients)."""
    device = windows.device
    model.eval()
    total = 0.0
    for start in range(0, len(windows), batch_size):
        w = windows[start : start + batch_size]
        with autocast(device, precision):
            logits = model(w[:, :-1])
        total += float(F.cross_entropy(logits.float(), w[:, 1:].reshape(-1), reduction="sum"))
    model.train()
    return total / (len(windows) * (windows.shape[1] - 1))


def _race_step(r: Runner, x, t, device: torch.device) -> None:
    common.sync(device)
    start = time.perf_counter()
    try:
        r.step(x, t)
        common.sync(device)
    except Exception as error:  # out of memory, say: the other runner goes on
        r.error = _describe(error)
        return
    r.seconds += time.perf_counter() - start
    r.steps += 1


def run_race(runners: list[Runner], train, held_out, args, device, share: float) -> None:
    """Lockstep rounds (the order rotating) until every runner has stepped ``share``
    seconds; the held-out loss at 20 evenly spaced points of each one's time."""
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train), generator=g).to(device)
    b = args.race_batch_size
    every = share / RACE_EVALUATIONS
    for r in runners:
        r.curve.append((0, 0.0, held_out_loss(r.model, held_out, b, args.race_precision)))
    hard_stop = time.perf_counter() + 3 * share * len(runners)  # a runaway step cannot hang it
    rounds = 0
    while time.perf_counter() < hard_stop:
        active = [r for r in runners if r.error is None and r.seconds < share]
        if not active:
            break
        rounds += 1
        for r in active[rounds % len(active) :] + active[: rounds % len(active)]:
            idx = order[(r.steps * b + torch.arange(b, device=device)) % len(order)]
            _race_step(r, train[idx, :-1], train[idx, 1:].reshape(-1), device)
            if r.error is None and (r.seconds >= len(r.curve) * every or r.seconds >= share):
                _evaluate(r, held_out, b, args.race_precision)
    for r in runners:  # stopped by the hard stop: its last step measured all the same
        if r.error is None and r.curve[-1][0] != r.steps:
            _evaluate(r, held_out, b, args.race_precision)


def _evaluate(r: Runner, held_out: torch.Tensor, batch_size: int, precision: str) -> None:
    r.curve.append((r.steps, r.seconds, held_out_loss(r.model, held_out, batch_size, precision)))


def race_decoder(args, device: torch.device) -> dict:
    """CurveBall against Adam on the decoder (byte vocabulary), loss against wall-clock."""
    d = QUICK_DECODER if args.quick else FULL_DECODER
    train, held_out = (w.to(device) for w in byte_windows(args.text_chars, d.seq))
    held_out = held_out[: args.held_out_windows]
    torch.manual_seed(args.seed)
    init = Decoder(256, d.seq, d.width, d.heads, d.layers)
    runners = []
    for name in RACE_CONTENDERS:
        model = _copy_to(init, device)
        step, _ = make_step(name, model, device, args.race_precision, ADAM_LR)
        runners.append(Runner(name, model, step))
    share = args.race_seconds / len(runners)
    run_race(runners, train, held_out, args, device, share)
    rows = [_race_row(r, runners) for r in runners]
    return {
        "model": f"decoder {d.layers}×{d.width}, {d.heads} heads, sequence {d.seq}, vocab 256",
        "precision": args.race_precision,
        "batch_size": args.race_batch_size,
        "seconds_each": share,
        "train_windows": len(train),
        "held_out_windows": len(held_out),
        "rows": rows,
    }


def _copy_to(init: nn.Module, device: torch.device) -> nn.Module:
    return copy.deepcopy(init).to(device)


def _race_row(r: Runner, runners: list[Runner]) -> dict:
    """A runner's outcome; the seconds it took to reach Adam's final held-out loss."""
    adam = next((o for o in runners if o.name == "adam" and o.error is None), None)
    goal = None if adam is None else adam.curve[-1][2]
    reach = None if goal is None else next((s for _, s, v in r.curve[1:] if v <= goal), None)
    return {
        "contender": r.name,
        "error": r.error,
        "steps": r.steps,
        "seconds": r.seconds,
        "step_ms": r.seconds / r.steps * 1e3 if r.steps else None,
        "initial_loss": r.curve[0][2] if r.curve else None,
        "final_loss": r.curve[-1][2] if r.curve else None,
        "seconds_to_adam_final": reach,
        "curve": r.curve,
    }


# ------------------------------------------------------------------------------ reporting
def _cell(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def steps_table(entries: list[dict]) -> str:
    lines = [
        "| model | contender | precision | batch | step ms (median) | steps timed "
        "| peak MiB | engine | error |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for e in entries:
        lines.append(
            f"| {e['model']} | {e['contender']} | {e['precision']} | {e['batch_size']} "
            f"| {_cell(e['step_ms'], '.2f')} | {e['repeats']} | {_mib(e['peak_memory_bytes'])} "
            f"| {e['engine'] or ''} | {e['error'] or ''} |"
        )
    return "\n".join(lines)


def race_table(result: dict) -> str:
    lines = [
        f"Race: {result['model']}, {result['precision']}, batch {result['batch_size']}, "
        f"{result['seconds_each']:.0f} s of stepping each; held-out loss "
        f"({result['held_out_windows']} windows)",
        "| contender | steps | step ms | initial loss | final loss "
        "| seconds to Adam's final loss | error |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['contender']} | {r['steps']} | {_cell(r['step_ms'], '.1f')} "
            f"| {_cell(r['initial_loss'], '.4f')} | {_cell(r['final_loss'], '.4f')} "
            f"| {_cell(r['seconds_to_adam_final'], '.1f')} | {r['error'] or ''} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------ the command
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="cuda (the default where there is one) or cpu")
    p.add_argument("--quick", action="store_true", help="tiny models and a seconds-long race")
    p.add_argument("--repeats", type=int, default=None, help="timed steps (default 10; quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 3; quick 1)")
    p.add_argument("--entry-seconds", type=float, default=8.0, help="an entry's timing cap")
    p.add_argument("--race-seconds", type=float, default=None, help="default 180; quick 2")
    p.add_argument("--race-precision", choices=PRECISIONS, default="fp32")
    p.add_argument("--race-batch-size", type=int, default=None, help="default: the decoder's")
    p.add_argument("--held-out-windows", type=int, default=None, help="default 64; quick 4")
    p.add_argument("--text-chars", type=int, default=None, help="default 5,000,000; quick 20,000")
    p.add_argument("--max-minutes", type=float, default=8.0, help="the whole check's budget")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH")
    args = p.parse_args(argv)
    quick = args.quick
    decoder = QUICK_DECODER if quick else FULL_DECODER
    defaults = {"repeats": 2 if quick else 10, "warmup": 1 if quick else 3,
                "race_seconds": 2.0 if quick else 180.0, "held_out_windows": 4 if quick else 64,
                "text_chars": 20_000 if quick else 5_000_000,
                "race_batch_size": decoder.batch_size}  # fmt: skip
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.repeats < 1 or args.warmup < 0 or args.race_batch_size < 1:
        p.error("--repeats and --race-batch-size must be positive, --warmup not negative")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: this torch sees no CUDA device")
    return args


def run(argv: list[str] | None = None) -> dict:
    """The whole check (the module docstring); ``--threads`` holds only while it runs."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return check(args)
    finally:
        torch.set_num_threads(threads)


def check(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    began = time.perf_counter()
    deadline = began + 60 * args.max_minutes - args.race_seconds - 30  # room for the race
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, quick={args.quick}", flush=True)
    s = Settings(device, args.warmup, args.repeats, args.entry_seconds, args.seed)
    entries = time_all(workloads(args.quick), s, deadline)
    print("\n" + steps_table(entries), flush=True)
    _free(device)
    left = 60 * args.max_minutes - (time.perf_counter() - began) - 20
    args.race_seconds = max(1.0, min(args.race_seconds, left))
    race_result = race_decoder(args, device)
    print("\n" + race_table(race_result), flush=True)
    report = {
        "device": name,
        "torch": torch.__version__,
        "settings": vars(args),
        "steps": entries,
        "race": race_result,
        "seconds": time.perf_counter() - began,
    }
    common.write_json(args.json, report)
    return report


if __name__ == "__main__":
    run()
