"""MemMamba's ablation switches, and moving weights between variants that differ only in them.

:data:`ABLATION_SWITCHES` are the config fields that switch a part of MemMamba off or change how
it decides, without changing the shape of anything the variants share: ``use_note_block``,
``use_cross_token``, ``use_cross_layer``, ``pool_policy``, ``tau1`` and ``tau2``.
:func:`transfer_weights` copies every parameter two such variants have in common from one into
the other and says what it could not copy:

- ``dropped``: parameters of the source the target has no use for (e.g. the cross-token
  attention and state scorer when the target has ``use_cross_token=False``);
- ``initialized``: parameters of the target the source lacks, left at their initialization;
- the fusion weights (one row of per-channel weights per memory context, in the order
  token context, layer context) are matched by context, not by row index: a block that loses its
  token context keeps its layer-context row.

Used by ``fidelity train --init`` (stage B of a variant from a full model's checkpoint) and by
``benchmarks/ablations.py`` (the shipped model with a part switched off at evaluation only).
Anything else that differs (another model, another width, another pool size) is refused with
:class:`~fidelity.errors.InputError`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

import torch

from fidelity.errors import InputError
from fidelity.models.base import CausalLM

ABLATION_SWITCHES = (
    "use_note_block",
    "use_cross_token",
    "use_cross_layer",
    "pool_policy",
    "tau1",
    "tau2",
)
"""MemMamba config fields in which ``--init`` and :func:`ablated` accept a difference."""
_FUSION = re.compile(r"layers\.(\d+)\.fusion\.(weights|gates\.(\d+)\.(weight|bias))$")


@dataclass
class Transfer:
    """What :func:`transfer_weights` did: the switches that differ (field -> [source value,
    target value]) and the parameter names it ``dropped`` (source only) or left
    ``initialized`` (target only); fusion contexts are named ``<parameter>[token]`` or
    ``<parameter>[layer]``."""

    switched: dict[str, list] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    initialized: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """One line for a user: the switches, then what was dropped and initialized."""
        switched = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in self.switched.items())
        return (
            f"switched {switched or 'nothing'}; dropped {len(self.dropped)} parameters "
            f"({', '.join(self.dropped) or 'none'}); left at initialization "
            f"{len(self.initialized)} ({', '.join(self.initialized) or 'none'})"
        )


def differing_fields(source: CausalLM, target: CausalLM) -> dict[str, list]:
    """Config fields whose values differ: field -> [source value, target value]; a different
    model type counts as a ``model_type`` difference."""
    found, wanted = source.config.to_dict(), target.config.to_dict()
    return {
        key: [found.get(key), wanted.get(key)]
        for key in sorted(found.keys() | wanted.keys())
        if found.get(key) != wanted.get(key)
    }


def _contexts(model: CausalLM, block: int) -> list[str]:
    """Names of the memory contexts block ``block`` fuses, in fusion order."""
    config = model.config
    names = ["token"] if config.use_cross_token else []
    return names + (["layer"] if config.has_cross_layer(block) else [])


def _by_context(model: CausalLM, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with fusion parameters keyed by context instead of by index: the weighted
    fusion's ``weights`` rows become ``...fusion.weights[token]`` etc., a gated fusion's
    ``gates.<i>.weight`` becomes ``...fusion.gates[token].weight``."""
    named = {}
    for name, value in state.items():
        match = _FUSION.match(name)
        if match is None:
            named[name] = value
            continue
        contexts = _contexts(model, int(match[1]))
        prefix = name[: match.start(2)]
        if match[2] == "weights":
            for index, context in enumerate(contexts):
                named[f"{prefix}weights[{context}]"] = value[index]
        else:
            named[f"{prefix}gates[{contexts[int(match[3])]}].{match[4]}"] = value
    return named


def _by_index(model: CausalLM, named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`_by_context` for ``model``, over its own state dict's names."""
    state = {}
    for name, value in model.state_dict().items():
        match = _FUSION.match(name)
        if match is None:
            state[name] = named.get(name, value)
            continue
        contexts = _contexts(model, int(match[1]))
        prefix = name[: match.start(2)]
        if match[2] == "weights":
            rows = [named.get(f"{prefix}weights[{c}]", value[i]) for i, c in enumerate(contexts)]
            state[name] = torch.stack(rows) if rows else value
        else:
            context = contexts[int(match[3])]
            state[name] = named.get(f"{prefix}gates[{context}].{match[4]}", value)
    return state


def transfer_weights(source: CausalLM, target: CausalLM) -> Transfer:
    """Copy into ``target`` every parameter (and buffer) it shares with ``source``; both must be
    the same model and differ at most in :data:`ABLATION_SWITCHES` (else InputError). Returns
    what differed and what was dropped or left at ``target``'s initialization."""
    differing = differing_fields(source, target)
    others = {k: v for k, v in differing.items() if k not in ABLATION_SWITCHES}
    if others or (differing and source.config.model_type != "memmamba"):
        raise InputError(
            f"not a {target.config.model_type} of this shape: "
            + ", ".join(f"{key}={a!r} (wanted {b!r})" for key, (a, b) in differing.items())
            + (
                f"; only MemMamba's ablation switches ({', '.join(ABLATION_SWITCHES)}) may differ"
                if target.config.model_type == "memmamba"
                else ""
            )
        )
    found = _by_context(source, source.state_dict())
    wanted = _by_context(target, target.state_dict())
    for name in found.keys() & wanted.keys():
        if found[name].shape != wanted[name].shape:
            raise InputError(
                f"not a {target.config.model_type} of this shape: parameter {name} has "
                f"shape {tuple(found[name].shape)} in the weights, "
                f"{tuple(wanted[name].shape)} in the model"
            )
    target.load_state_dict(_by_index(target, found), strict=True)
    return Transfer(
        switched=differing,
        dropped=sorted(found.keys() - wanted.keys()),
        initialized=sorted(wanted.keys() - found.keys()),
    )


def ablated(model: CausalLM, **switches) -> tuple[CausalLM, Transfer]:
    """``model`` with some :data:`ABLATION_SWITCHES` changed at evaluation only (no training):
    a new model of the changed config holding ``model``'s weights (see
    :func:`transfer_weights`), in eval mode, with ``model``'s provenance plus
    ``ablated_at_evaluation`` (the :class:`Transfer`). Parameters the change adds (none for the
    switches that only turn parts off) keep their seeded initialization."""
    unknown = sorted(set(switches) - set(ABLATION_SWITCHES))
    if unknown:
        raise InputError(f"not ablation switches: {unknown}; choose from {ABLATION_SWITCHES}")
    torch.manual_seed(0)
    variant = type(model)(model.config.replace(**switches))
    transfer = transfer_weights(model, variant)
    variant.eval()
    variant.provenance = {
        **getattr(model, "provenance", {}),
        "ablated_at_evaluation": transfer.to_dict(),
    }
    return variant, transfer
