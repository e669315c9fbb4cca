"""A function evaluated on dual numbers, with or without the lean rules: the harness of the
tests that compare a forward-mode rule with PyTorch's own formula."""

from __future__ import annotations

import torch.autograd.forward_ad as fwAD

from curveball._curvature.lean_rules import LeanTangents


def run_dual(fn, primals, tangents, rules: LeanTangents | None = None):
    """``fn`` on dual inputs (``None`` tangent: a plain input), under ``rules`` if given;
    returns the primals and the tangents (``None`` where there is none) of all its outputs
    (both ``None`` for an output that is ``None``)."""
    with fwAD.dual_level() as level:
        args = [
            p if t is None else fwAD.make_dual(p, t) for p, t in zip(primals, tangents, strict=True)
        ]
        if rules is None:
            out = fn(*args)
        else:
            rules.level = level
            with rules:
                out = fn(*args)
        outs = out if isinstance(out, tuple) else (out,)
        primals_out, tangents_out = [], []
        for o in outs:  # an output that is None (MHA's absent weights) gives None, None
            primal, tangent = fwAD.unpack_dual(o) if o is not None else (None, None)
            primals_out.append(None if primal is None else primal.detach().clone())
            tangents_out.append(None if tangent is None else tangent.clone())
        return primals_out, tangents_out


def run_first(fn, primals, tangents, rules: LeanTangents | None = None):
    """``(primal, tangent)`` of ``fn``'s first output (see :func:`run_dual`)."""
    primal, tangent = run_dual(fn, primals, tangents, rules)
    return primal[0], tangent[0]
