"""The step's own memory as items: activations and temporaries of every group that runs, placed in
the phases where they are alive, next to the model states.

Pure arithmetic. Decoder LLMs come from `activations.decoder_step_memory` (checked against traced
steps, docs/activations.md).
"""

from __future__ import annotations

from collections.abc import Sequence

from planner.architectures import DECODER_TYPES
from planner.estimate.activations import decoder_step_memory
from planner.estimate.result import FROM_BACKWARD, Category, Item, Phase, Place
from planner.estimate.states import working_dtype
from planner.options import Engine, TrainingOptions
from planner.profile import ModelSpec
from planner.workload import Param, Workload

FORWARD = frozenset({Phase.FORWARD})
BACKWARD = frozenset({Phase.BACKWARD})
OPTIMIZER = frozenset({Phase.OPTIMIZER})


def step_items(model: ModelSpec, params: Sequence[Param], options: TrainingOptions, workload: Workload,
               state_items: list[Item]) -> tuple[list[Item], list[str]]:
    """Activation and temporary items for one rank, and notes on what could not be modeled.

    Under plain PyTorch the gradients build up during backward: the model-state gradient items
    are moved to the optimizer phase and the gradients alive at the backward peak are added for
    the backward phase. Under DeepSpeed the engine's own gradient items stand as they are, and
    the decoder runs as a 16-bit module without autocast.
    """
    items: list[Item] = []
    notes: list[str] = []
    modeled: set[str] = set()
    built = {p.group for p in params}
    for group in model.groups:
        if group.name not in built:
            continue
        if group.kind != "decoder":
            if any(p.group == group.name for p in params):
                notes.append(f"activations of {group.name} ({group.kind}) are not modeled yet")
            continue
        if group.config.get("model_type") not in DECODER_TYPES:
            notes.append(f"activations of {group.name}: no activation model for model_type "
                         f"{group.config.get('model_type')!r}")
            continue
        mine = [p for p in params if p.group == group.name]
        deepspeed = options.engine is Engine.DEEPSPEED
        mem = decoder_step_memory(
            group.config,
            micro_batch=workload.micro_batch,
            seq_len=workload.seq_len,
            precision=options.precision.value,
            attn=options.attn.value,
            grad_ckpt=options.grad_ckpt,
            optimizer_impl=options.optimizer_impl,
            params=mine,
            module_dtype_bytes=working_dtype(options).itemsize if deepspeed else None,
            autocast=False if deepspeed else None,
        )
        g = group.name
        modeled.add(g)
        items += [
            Item(g, Category.ACTIVATIONS, Place.GPU, mem.forward_activations + mem.inputs, FORWARD),
            Item(g, Category.TEMPORARIES, Place.GPU, mem.forward_temporaries, FORWARD),
            Item(g, Category.ACTIVATIONS, Place.GPU, mem.backward_activations + mem.inputs, BACKWARD),
            Item(g, Category.TEMPORARIES, Place.GPU, mem.backward_temporaries, BACKWARD),
            Item(g, Category.ACTIVATIONS, Place.GPU, mem.inputs, OPTIMIZER),
        ]
        if not deepspeed:
            items.append(Item(g, Category.TEMPORARIES, Place.GPU, mem.optimizer_temporaries, OPTIMIZER))
            if workload.grad_accum == 1:  # with accumulation every .grad already exists (states.py)
                items.append(Item(g, Category.GRADIENTS, Place.GPU, mem.backward_gradients, BACKWARD))
    if options.engine is Engine.TORCH and workload.grad_accum == 1:
        # A modeled decoder's .grad tensors: all of them in the optimizer step; at the backward
        # peak only those already produced (added above).
        state_items[:] = [
            Item(it.group, it.category, it.place, it.nbytes, OPTIMIZER)
            if it.group in modeled and it.category is Category.GRADIENTS and it.phases == FROM_BACKWARD else it
            for it in state_items
        ]
    return [it for it in items if it.nbytes], notes
