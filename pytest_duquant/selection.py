"""Which nn.Linear layers a config picks: SCOPE, INCLUDE/EXCLUDE or LAYERS, the action head, per-layer bits."""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from pytest_duquant.config import DuQuantConfig

ACTION_HEAD = "action_out_proj"


@dataclass(frozen=True)
class LinearChoice:
    """One nn.Linear of a model and whether the config selects it (with the reason when not)."""

    name: str
    in_features: int
    out_features: int
    selected: bool
    reason: str
    wbits: int
    quantized: bool = False  # already a quantized layer (DuQuantLinear, RTNLinear, ...)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "shape": [self.out_features, self.in_features],
            "selected": self.selected,
            "reason": self.reason,
            "wbits": self.wbits if self.selected else None,
            "already_quantized": self.quantized,
        }


def in_scope(name: str, scope: str) -> bool:
    """`name` starts with `scope`, directly or after a wrapper prefix ending in '.' (e.g. 'model.')."""
    return not scope or ("." + scope) in ("." + name)


def is_action_head(name: str) -> bool:
    return name == ACTION_HEAD or name.endswith("." + ACTION_HEAD)


def _matches_layers(name: str, layers: tuple[str, ...]) -> bool:
    return any(name == item or name.endswith("." + item) for item in layers)


def choose(name: str, config: DuQuantConfig) -> tuple[bool, str]:
    """Whether layer `name` is selected, and why (or why not)."""
    if is_action_head(name):
        if config.include_action_head:
            return True, "action head (INCLUDE_ACTION_HEAD=1)"
        return False, "action head (set INCLUDE_ACTION_HEAD=1)"
    if config.layers is not None:
        return (True, "in LAYERS") if _matches_layers(name, config.layers) else (False, "not in LAYERS")
    if not in_scope(name, config.scope):
        return False, "outside SCOPE"
    if not re.search(config.include, name):
        return False, "not matched by INCLUDE"
    if re.search(config.exclude, name):
        return False, "matched by EXCLUDE"
    return True, "SCOPE+INCLUDE"


def linear_choices(model: nn.Module, config: DuQuantConfig) -> list[LinearChoice]:
    """Every nn.Linear (or already-quantized layer: one that says ``quantized_linear = True``) of `model`, in
    module order, with the config's decision."""
    out = []
    for name, module in model.named_modules():
        wrapped = getattr(module, "quantized_linear", False) is True
        if not (isinstance(module, nn.Linear) or wrapped):
            continue
        selected, reason = choose(name, config) if config.enabled else (False, "preset fp")
        out.append(
            LinearChoice(
                name=name,
                in_features=module.in_features,
                out_features=module.out_features,
                selected=selected,
                reason=reason,
                wbits=config.wbits_for(name),
                quantized=wrapped,
            )
        )
    return out


def unmatched_layer_names(choices: list[LinearChoice], config: DuQuantConfig) -> list[str]:
    """Entries of LAYERS / WBITS that name no linear of the model (likely typos)."""
    names = [c.name for c in choices]
    wanted = list(config.layers or ()) + [k for k, _ in config.wbits]
    return [w for w in wanted if not any(n == w or n.endswith("." + w) for n in names)]
