"""What the built-in target trains: the plan's parameter inventory mapped onto the real model.

Part of the train stage, used by `planner.train`. `trainable_inventory` lists every tensor the
plan's estimate counted; here each one is given the name it has in the loaded model, the
model's ``requires_grad`` flags (or peft's LoRA config) are set from it, and the result is
checked tensor by tensor: a run that would train something the plan did not count, or hold a
tensor the plan does not know, stops before the first step.

Names: a profile's ``llm`` group lists the causal LM's own ``named_parameters()`` names, so a
plain causal LM matches as is; in a model of several groups (MiniCPM) each group is the
top-level module of that name, so its tensors are ``<group>.<name>``. A model read from a local
config.json (`hf_config`) already carries the full names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planner.profile.catalog import ModelSpec
from planner.workload.inventory import Origin, Param, trainable_inventory
from planner.workload.options import TrainingOptions

PEFT_ADAPTER = "default"
"""The adapter name peft gives the first adapter (``get_peft_model(adapter_name="default")``)."""

_PEFT_PREFIX = "base_model.model."
_SHOWN = 4
"""Names quoted in a mismatch message before "and N more"."""


class PlanMismatch(ValueError):
    """The loaded model and the plan's inventory disagree; the message says how."""


@dataclass(frozen=True)
class Inventory:
    """The plan's tensors under the loaded model's names.

    Attributes:
        spec: the model spec the plan's inventory comes from.
        params: the inventory, in model order.
        prefixed: whether tensor names get their group's name in front (several groups).
    """

    spec: ModelSpec
    params: tuple[Param, ...]
    prefixed: bool

    def name(self, p: Param) -> str:
        """``p``'s parameter name in the loaded model (LoRA and copies: as peft's, adapter name left out)."""
        return f"{p.group}.{p.tensor.name}" if self.prefixed else p.tensor.name

    @property
    def multimodal(self) -> bool:
        """Whether the model has a vision tower (MiniCPM's ``vpm`` group)."""
        return any(g.name == "vpm" for g in self.spec.groups)

    def expected(self) -> dict[tuple[str, str], tuple[bool, tuple[int, ...]]]:
        """(name, origin) -> (trained, shape) of every tensor the run should hold."""
        return {(self.name(p), p.origin): (p.trainable, tuple(p.tensor.shape)) for p in self.params}


def load_inventory(plan_model_name: str, model_path: str, options: TrainingOptions) -> Inventory:
    """The inventory of the model the plan was made for: its profile when the plan names one,
    otherwise the config.json at ``model_path``.

    Raises:
        ProfileError: neither a profile nor a local config, or the options select what the model lacks.
    """
    from planner.errors import ProfileError
    from planner.profile.catalog import build_model, load_catalog

    catalog = load_catalog()
    if catalog.has_model(plan_model_name):
        spec = build_model(catalog.model(plan_model_name))
        prefixed = len(spec.groups) > 1
    else:
        from planner.profile.hf_config import find_config, model_from_config

        if find_config(model_path) is None:
            raise ProfileError(f"the plan's model {plan_model_name!r} is not a profile and {model_path} has no "
                               "config.json; pass --model with a local copy of the model")
        spec = model_from_config(Path(model_path))
        prefixed = False
    return Inventory(spec, tuple(trainable_inventory(spec, options)), prefixed)


def _shape(param: Any) -> tuple[int, ...]:
    return tuple(getattr(param, "ds_shape", None) or param.shape)  # ZeRO-3 keeps the full shape in ds_shape


def _peft_name(name: str) -> tuple[str, str]:
    """A loaded (possibly peft-wrapped) parameter name -> (inventory name, origin)."""
    n = name.removeprefix(_PEFT_PREFIX)
    saved = f".modules_to_save.{PEFT_ADAPTER}."
    if saved in n:
        return n.replace(saved, "."), Origin.COPY
    n = n.replace(".original_module.", ".").replace(".base_layer.", ".")
    lora = re.sub(rf"\.(lora_[AB])\.{PEFT_ADAPTER}\.", r".\1.", n)
    return lora, Origin.LORA if lora != n else Origin.BASE


def _sample(names: set[tuple[str, str]] | set[str]) -> str:
    shown = sorted(n if isinstance(n, str) else n[0] + ("" if n[1] == Origin.BASE else f" ({n[1]})")
                   for n in names)
    more = f" and {len(shown) - _SHOWN} more" if len(shown) > _SHOWN else ""
    return ", ".join(shown[:_SHOWN]) + more


def check(model: Any, inv: Inventory, what: str) -> None:
    """The model's parameters are exactly the inventory's: same names, shapes and trained flags.

    Args:
        model: the loaded model, peft-wrapped or not.
        inv: the plan's inventory.
        what: ``base`` to compare only the model's own tensors and not the flags (before
            freezing), ``trained`` for everything.

    Raises:
        PlanMismatch: a tensor unknown to the plan, one the plan counts that the model lacks, a
            shape that differs, or a tensor trained (frozen) that the plan freezes (trains).
    """
    expected = inv.expected()
    if what == "base":
        expected = {k: v for k, v in expected.items() if k[1] == Origin.BASE}
    actual = {_peft_name(n): (p.requires_grad, _shape(p)) for n, p in model.named_parameters()}
    unknown, missing = set(actual) - set(expected), set(expected) - set(actual)
    hint = (f" (the plan was made for {inv.spec.name!r}: load that model, or plan this one with "
            "`memplan tune --model PATH`)" if what == "base" else "")
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"{len(unknown)} tensor(s) the plan does not count: {_sample(unknown)}")
        if missing:
            parts.append(f"{len(missing)} tensor(s) of the plan the model lacks: {_sample(missing)}")
        raise PlanMismatch(f"the model and the plan disagree: {'; '.join(parts)}{hint}")
    shapes = {k for k in expected if expected[k][1] != actual[k][1]}
    if shapes:
        k = sorted(shapes)[0]
        raise PlanMismatch(f"the model and the plan disagree on {len(shapes)} shape(s), e.g. {k[0]}: "
                           f"model {list(actual[k][1])}, plan {list(expected[k][1])}{hint}")
    if what == "base":
        return
    extra = {k for k in expected if actual[k][0] and not expected[k][0]}
    short = {k for k in expected if expected[k][0] and not actual[k][0]}
    if extra or short:
        parts = []
        if extra:
            parts.append(f"it would train {len(extra)} tensor(s) the plan freezes: {_sample(extra)}")
        if short:
            parts.append(f"it would freeze {len(short)} tensor(s) the plan trains: {_sample(short)}")
        raise PlanMismatch(f"the run and the plan disagree: {'; '.join(parts)}")


def freeze(model: Any, inv: Inventory) -> None:
    """Set ``requires_grad`` from the inventory (full fine-tuning and frozen groups, no LoRA)."""
    trained = {inv.name(p) for p in inv.params if p.trainable and p.origin == Origin.BASE}
    for name, param in model.named_parameters():
        param.requires_grad_(name in trained)


def lora_settings(model: Any, inv: Inventory) -> dict[str, list[str]]:
    """peft ``LoraConfig`` fields from the inventory: ``target_modules``, the full names of the
    linears that get adapters, and ``modules_to_save``, the largest modules whose every tensor
    the plan trains as a copy (peft copies whole modules).

    Raises:
        PlanMismatch: the plan trains part of a module (peft can only copy all of it), or a module
            both adapted and fully trained.
    """
    targets = sorted({inv.name(p).removesuffix(".lora_A.weight") for p in inv.params
                      if p.origin == Origin.LORA and p.tensor.name.endswith(".lora_A.weight")})
    copies = {inv.name(p) for p in inv.params if p.origin == Origin.COPY}
    names = [n for n, _ in model.named_parameters()]
    cache: dict[str, set[str]] = {}

    def under(module: str) -> set[str]:
        if module not in cache:
            cache[module] = {n for n in names if n.startswith(module + ".")}
        return cache[module]

    def adapted(module: str) -> bool:
        return any(t == module or t.startswith(module + ".") for t in targets)

    chosen: set[str] = set()
    for name in sorted(copies):
        parts = name.split(".")[:-1]
        best = None
        for k in range(len(parts), 0, -1):
            module = ".".join(parts[:k])
            if not under(module) <= copies or adapted(module):
                break
            best = module
        if best is None:
            owner = ".".join(parts)
            why = "it also gets LoRA adapters" if adapted(owner) else "the plan trains only some of its tensors"
            raise PlanMismatch(f"peft cannot train {name} as a copy: {why} (peft copies whole modules)")
        chosen.add(best)
    # keep the outermost: a chosen module inside another chosen one is covered by it
    outer = sorted(m for m in chosen if not any(m.startswith(o + ".") for o in chosen))
    return {"target_modules": targets, "modules_to_save": outer}
