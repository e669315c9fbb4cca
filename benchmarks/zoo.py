"""A zoo of small models that people use, each with a batch and a loss.

Shared by the conformance benchmark (``python -m benchmarks.conformance``) and the
test suite's case matrix. Every family builds a seeded model of a few thousand
parameters and a seeded batch; ``predict`` maps the model and the batch's inputs
to a 2-D tensor of predictions (tokens flattened into rows for sequence models),
and the loss is the mean cross-entropy over those rows.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

VOCAB, CLASSES, WIDTH, SEQ, BATCH = 11, 3, 8, 6, 4


@dataclass(frozen=True)
class Family:
    """One model family of the zoo.

    Attributes:
        name: a short identifier.
        build: the model (seeded by the caller).
        inputs: the inputs of a batch of ``BATCH`` samples from a generator.
        predict: ``(model, inputs) -> predictions`` of shape ``(rows, classes)``.
        classes: the number of classes per row.
        forward_mode: whether PyTorch has forward-mode formulas for every operation,
            so that CurveBall runs in forward mode (else it falls back).
        needs: a package that must be importable (else the family is unavailable).
        train: the mode the model runs in.
    """

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], tuple]
    predict: Callable[[nn.Module, tuple], torch.Tensor]
    classes: int = CLASSES
    forward_mode: bool = True
    needs: str | None = None
    train: bool = True
    tags: tuple[str, ...] = field(default=())

    def make(self, seed: int = 0, dtype: torch.dtype = torch.float64):
        """``(model, inputs, targets)`` for one seeded batch."""
        torch.manual_seed(seed)
        model = self.build().to(dtype).train(self.train)
        g = torch.Generator().manual_seed(seed + 1)
        inputs = tuple(t.to(dtype) if t.is_floating_point() else t for t in self.inputs(g))
        with torch.no_grad():  # on a copy: the model's buffers stay as built
            rows = self.predict(copy.deepcopy(model), inputs).shape[0]
        targets = torch.randint(0, self.classes, (rows,), generator=g)
        return model, inputs, targets

    def model_fn(self, model: nn.Module, inputs: tuple) -> Callable[[], torch.Tensor]:
        return lambda: self.predict(model, inputs)

    @staticmethod
    def traceable(model: nn.Module) -> nn.Module:
        """A copy computing the same function without activation checkpointing."""
        clone = copy.deepcopy(model)
        for module in clone.modules():
            if isinstance(module, Checkpointed):
                module.checkpointing = False
        return clone


def _images(channels: int = 2, size: int = 6):
    return lambda g: (torch.randn(BATCH, channels, size, size, generator=g),)


def _vectors(g: torch.Generator) -> tuple:
    return (torch.randn(BATCH, WIDTH, generator=g),)


def _tokens(g: torch.Generator) -> tuple:
    return (torch.randint(0, VOCAB, (BATCH, SEQ), generator=g),)


def _sequences(g: torch.Generator) -> tuple:
    return (torch.randn(BATCH, SEQ, WIDTH, generator=g),)


def _call(model: nn.Module, inputs: tuple) -> torch.Tensor:
    return model(*inputs)


def _rows(model: nn.Module, inputs: tuple) -> torch.Tensor:
    out = model(*inputs)
    return out.reshape(-1, out.shape[-1])


class ResidualBlock(nn.Module):
    """conv-bn-relu-conv-bn plus the identity, then pooling and a classifier."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, channels, 3, padding=1)
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 3))

    def forward(self, x):
        h = self.stem(x)
        return self.head(torch.relu(h + self.body(h)))


class Encoder(nn.Module):
    """A transformer encoder with a padding or a causal mask, classifying every token."""

    def __init__(self, norm_first: bool, mask: str) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            WIDTH, 2, 16, dropout=0.0, batch_first=True, norm_first=norm_first
        )
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(WIDTH, CLASSES)
        self.mask = mask

    def forward(self, x):
        if self.mask == "causal":
            causal = nn.Transformer.generate_square_subsequent_mask(SEQ, dtype=x.dtype)
            h = self.encoder(x, mask=causal, is_causal=True)
        else:
            padding = torch.zeros(x.shape[:2], dtype=torch.bool)
            padding[:, -2:] = True  # the last two positions are padding
            h = self.encoder(x, src_key_padding_mask=padding)
        return self.head(h)


class SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(WIDTH, 2, batch_first=True)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x):
        h, _ = self.attention(x, x, x, need_weights=False)
        return self.head(h + x)


class RecurrentLM(nn.Module):
    """Embedding, a recurrent layer, next-token logits."""

    def __init__(self, kind: type[nn.RNNBase]) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, WIDTH)
        self.rnn = kind(WIDTH, 12, batch_first=True)
        self.head = nn.Linear(12, VOCAB)

    def forward(self, tokens):
        h, _ = self.rnn(self.embedding(tokens))
        return self.head(h)


class Checkpointed(nn.Module):
    """Non-reentrant activation checkpointing around the hidden layer (``checkpointing``
    off computes the same function without it, for oracles that cannot trace it)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(WIDTH, 16), nn.Linear(16, CLASSES)
        self.checkpointing = True

    def forward(self, x):
        def hidden(h):
            return torch.tanh(self.a(h))

        if self.checkpointing:
            return self.b(checkpoint(hidden, x, use_reentrant=False))
        return self.b(hidden(x))


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=SEQ,
        n_embd=WIDTH,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        attn_pdrop=0.0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


def _bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=SEQ,
        num_labels=CLASSES,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


def _logits(model: nn.Module, inputs: tuple) -> torch.Tensor:
    out = model(*inputs).logits
    return out.reshape(-1, out.shape[-1])


ZOO: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "mlp",
            lambda: nn.Sequential(nn.Linear(WIDTH, 32), nn.Tanh(), nn.Linear(32, CLASSES)),
            _vectors,
            _call,
        ),
        Family(
            "cnn + batch norm",
            lambda: nn.Sequential(
                nn.Conv2d(2, 4, 3, padding=1),
                nn.BatchNorm2d(4),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Flatten(),
                nn.Linear(36, CLASSES),
            ),
            _images(),
            _call,
        ),
        Family("resnet block", ResidualBlock, _images(), _call),
        Family(
            "transformer post-norm, padding mask, eval",
            lambda: Encoder(False, "padding"),
            _sequences,
            _rows,
            train=False,
        ),
        Family(
            "transformer pre-norm, causal mask, train",
            lambda: Encoder(True, "causal"),
            _sequences,
            _rows,
        ),
        Family("multi-head attention", SelfAttention, _sequences, _rows),
        Family("lstm language model", lambda: RecurrentLM(nn.LSTM), _tokens, _rows, VOCAB),
        Family("gru language model", lambda: RecurrentLM(nn.GRU), _tokens, _rows, VOCAB),
        Family(
            "layer norm mlp",
            lambda: nn.Sequential(
                nn.Linear(WIDTH, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, CLASSES)
            ),
            _vectors,
            _call,
        ),
        Family(
            "group norm cnn",
            lambda: nn.Sequential(
                nn.Conv2d(2, 4, 3, padding=1),
                nn.GroupNorm(2, 4),
                nn.SiLU(),
                nn.AvgPool2d(2),
                nn.Flatten(),
                nn.Linear(36, CLASSES),
            ),
            _images(),
            _call,
        ),
        Family(
            "conv transpose",
            lambda: nn.Sequential(
                nn.Conv2d(2, 3, 3, stride=2),
                nn.Tanh(),
                nn.ConvTranspose2d(3, 2, 3, stride=2),
                nn.Flatten(),
                nn.Linear(50, CLASSES),
            ),
            _images(2, 5),
            _call,
        ),
        Family(
            "spectral norm",
            lambda: nn.Sequential(
                nn.utils.parametrizations.spectral_norm(nn.Linear(WIDTH, 16)),
                nn.Tanh(),
                nn.Linear(16, CLASSES),
            ),
            _vectors,
            _call,
        ),
        Family("activation checkpointing", Checkpointed, _vectors, _call, forward_mode=False),
        Family("gpt-2 (transformers)", _gpt2, _tokens, _logits, VOCAB, needs="transformers"),
        Family("bert (transformers)", _bert, _tokens, _logits, needs="transformers"),
    )
}


def available(family: Family) -> bool:
    """Whether the family's optional package is installed."""
    if family.needs is None:
        return True
    try:
        __import__(family.needs)
    except ImportError:
        return False
    return True


def cross_entropy(targets: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda y: F.cross_entropy(y, targets)
