"""The step tape: one allocation ledger and one autograd replay, shared by every step simulator.

Estimate stage; pure arithmetic (no torch, no I/O). A simulator (the decoder in decoder.py,
the encoders in encoders.py) writes its model's forward out op by op with the tape's ops
(``planner.estimate.ops``, on the ledger of ``planner.estimate.ledger``); each op
allocates its outputs on the ledger and records an autograd node with the tensors the real op
saves (torch ``tools/autograd/derivatives.yaml``). ``Tape.backward`` then runs the nodes in
reverse creation order, the autograd engine's order on one device: each node allocates its input
gradients, releases what it saved and its incoming gradient; gradients are cast to the input's
dtype (engine.cpp ``validate_outputs``), summed where a tensor feeds two consumers
(``InputBuffer::add``), and kept as ``.grad`` by parameters. Non-reentrant checkpoint regions save
placeholders and are replayed in backward under a fresh autocast cache. Under autocast, trainable
fp32 weights are cast once and cached until the region ends; frozen ones at every use.

Peaks are taken after every allocation, per phase, and the last of equal peaks wins (as in the
tracer). Categories follow torch's ``MemTracker``: ``activations`` (born in forward or in a
recomputation), ``temporaries`` (born in backward), ``gradients`` (parameter ``.grad``).
Docs: docs/activations.md ("How it is computed") and docs/encoders.md ("How it works").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum

from planner.estimate.ledger import HALF, Ledger, Param, Tensor
from planner.estimate.ops import TapeOps

Backward = Callable[["Tape", list[Tensor | None]], list[Tensor | None]]
"""A node's backward: given the gradients of its outputs, allocate and return its inputs'."""


@dataclass(eq=False)
class Node:
    """An autograd node: the tensors whose gradients it consumes (``outs``), the tensors it sends
    gradients to (``ins``), what it saved (``nsaved`` of them; under checkpoint they arrive with
    the recomputation), and its backward."""

    outs: list[Tensor]
    ins: list[Tensor | None]
    saved: list[Tensor]
    bw: Backward
    nsaved: int = 0


@dataclass(eq=False)
class Region:
    """A stretch of the forward's nodes. A checkpoint region also keeps the function that replays
    it from ``x`` and the references it holds (``x`` and its other tensor arguments) until its
    nodes have run."""

    fn: Callable[[Tensor], Tensor] | None = None
    x: Tensor | None = None
    held: list[Tensor] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)
    recomputed: bool = False


class Recompute(Enum):
    """When a checkpoint region is replayed and where the replay stops. They differ in a region's
    last few ops and in a region that saved nothing (docs/activations.md, "Checkpointing")."""

    AT_UNPACK = "unpack"
    """torch.utils.checkpoint as it runs: replay when backward first unpacks a saved tensor, stop
    once the last one is packed (``_checkpoint_early_stop``); a region that saved nothing holds
    nothing and is never replayed (the decoder and the encoders, each matched to its traces)."""
    AT_REGION = "region"
    """Replay when backward reaches the region, even one that saved nothing (its inputs are held
    until then), and stop where the replayed code calls ``Tape.early_stop``. The decoder's rule
    until its LoRA traces showed torch's (a LoRA adapter on down_proj); no simulator uses it now."""


class GradSum(Enum):
    """How a parameter used by several ops gets its ``.grad``."""

    AFTER_ALL_USES = "after-all-uses"
    """AccumulateGrad runs once every use has delivered; a second gradient is summed out of place
    first (a tied embedding and lm_head; measured) and the sum becomes ``.grad`` (the decoder)."""
    FIRST_IN_PLACE = "first-in-place"
    """The first gradient becomes ``.grad`` at once, later ones add into it in place (a tower's
    weights used once per chunk of crops; the encoders)."""


# --------------------------------------------------------------------------------------------
# The tape: tensors, nodes, checkpoint regions and the backward engine
# --------------------------------------------------------------------------------------------


class Tape(TapeOps):
    """A step replay: the ledger, the recorded graph, autocast's weight cache and the ops.

    Args:
        autocast: CUDA autocast to 16 bit over the forward (HF Trainer amp).
        weight_item: bytes per element of parameters and buffers.
        recompute: how checkpoint regions are replayed.
        grad_sum: how a parameter used several times gets its gradient.
    """

    def __init__(self, *, autocast: bool, weight_item: int, recompute: Recompute, grad_sum: GradSum) -> None:
        self.ledger = Ledger()
        self.autocast = autocast
        self.weight_item = weight_item
        self.compute_item = HALF if autocast else weight_item  # matmuls' element size
        self.recompute = recompute
        self.grad_sum = grad_sum
        self.cache: dict[int, Tensor] | None = {} if autocast else None  # id(weight) -> its cast
        self.regions: list[Region] = [Region()]
        self.region: Region | None = None  # checkpoint region in its first forward
        self.replay: list[Tensor] | None = None  # tensors a recomputation packed, in order
        self.replay_target: int | None = None  # AT_UNPACK: stop once this many are packed
        self.stopped = False  # the recomputation stopped early: nothing more is allocated
        self.slots: dict[int, Tensor] = {}  # id(tensor) -> gradient waiting for its node
        self.leaves: dict[int, Tensor | None] = {}  # non-parameter leaves that require grad -> .grad

    # ---- tensors ------------------------------------------------------------------------------
    def new(self, numel: int, item: int, rg: bool = False) -> Tensor:
        """A fresh tensor: an activation in forward or recomputation, a temporary in backward."""
        return self.materialize(Tensor(numel, item, rg))

    def materialize(self, t: Tensor) -> Tensor:
        """Give ``t`` its storage (none once a recomputation has stopped early)."""
        if not self.stopped:
            backward = self.ledger.phase == "backward" and self.replay is None
            t.st = self.ledger.alloc(t.numel * t.item, "temporaries" if backward else "activations")
        return t

    def param(self, numel: int, trainable: bool, item: int | None = None, name: str = "") -> Tensor:
        """A parameter of ``numel`` elements (``item``: default the module's)."""
        item = self.weight_item if item is None else item
        return Tensor(numel, item, trainable, None, Param(name, numel, item, trainable))

    def alias(self, t: Tensor | None) -> Tensor | None:
        """Another Python reference to ``t`` (a view, or the same tensor returned)."""
        if t is not None:
            self.ledger.ref(t.st)
        return t

    def view(self, t: Tensor | None, numel: int) -> Tensor | None:
        """A view of ``t`` with ``numel`` elements (same storage; not a graph op)."""
        if t is None:
            return None
        self.ledger.ref(t.st)
        return Tensor(numel, t.item, t.rg, t.st)

    def drop(self, *ts: Tensor | None) -> None:
        for t in ts:
            if t is not None:
                self.ledger.unref(t.st)

    def make_leaf(self, t: Tensor) -> None:
        """``t.requires_grad_(True)`` on an activation: it gets its own ``.grad``, alive until the
        graph dies (``enable_input_require_grads``)."""
        t.rg = True
        self.leaves[id(t)] = None

    def node(self, outs: list[Tensor], ins: Sequence[Tensor | None], saved: Sequence[Tensor | None],
             bw: Backward) -> None:
        """Record an autograd node if any input requires grad. Saved tensors are referenced until
        the node runs; under checkpoint they are placeholders, and a recomputation packs them."""
        if not any(t is not None and t.rg for t in ins):
            return
        real = [t for t in saved if t is not None and t.st is not None]
        if self.replay is not None:  # a recomputation packs them for the recorded nodes
            self.replay.extend(self.alias(t) for t in real)
            if self.replay_target is not None:
                self.stopped = len(self.replay) >= self.replay_target
            return
        for t in ins:
            if t is not None and t.param is not None and t.rg:
                t.param.uses += 1
        kept = [] if self.region is not None else [self.alias(t) for t in real]
        self.regions[-1].nodes.append(Node(outs, list(ins), kept, bw, len(real)))

    def grad(self, like: Tensor) -> Tensor:
        """A new gradient tensor (a temporary) shaped like ``like``."""
        return self.new(like.numel, like.item)

    # ---- checkpointing ------------------------------------------------------------------------
    def checkpoint(self, fn: Callable[[Tensor], Tensor], x: Tensor, held: Sequence[Tensor | None] = (),
                   enabled: bool = True) -> Tensor:
        """``fn(x)``, when ``enabled`` as a non-reentrant checkpoint region holding ``x`` and
        ``held`` (its other tensor arguments) for backward. Nested regions run plainly."""
        if not enabled or self.region is not None:
            return fn(x)
        region = Region(fn, x, [self.alias(x), *(self.alias(t) for t in held if t is not None)])
        self.regions.append(region)
        self.region = region
        out = fn(x)
        self.region = None
        self.regions.append(Region())
        if not region.nodes and self.recompute is Recompute.AT_UNPACK:
            self.drop(*region.held)
            region.held = []
        return out

    def early_stop(self) -> None:
        """Under ``Recompute.AT_REGION``: a recomputation allocates nothing from here on."""
        if self.replay is not None and self.recompute is Recompute.AT_REGION:
            self.stopped = True

    def _recompute(self, region: Region) -> None:
        """Replay the region under a fresh autocast cache; the saved tensors go to its nodes by
        packing order, as torch.utils.checkpoint matches them."""
        assert region.fn is not None and region.x is not None
        self.replay, self.stopped = [], False
        if self.recompute is Recompute.AT_UNPACK:
            self.replay_target = sum(n.nsaved for n in region.nodes)
        outer_cache, self.cache = self.cache, ({} if self.autocast else None)
        out = region.fn(region.x)
        self.end_autocast()
        self.cache = outer_cache
        packed = iter(self.replay)
        for n in region.nodes:
            n.saved = [next(packed) for _ in range(n.nsaved)]
        self.replay, self.replay_target, self.stopped = None, None, False
        self.drop(out)
        region.recomputed = True

    # ---- backward -----------------------------------------------------------------------------
    def backward(self, out: Tensor, grad: Tensor) -> None:
        """Run the graph backward from ``out`` given its gradient ``grad`` (allocated by the
        caller once ``ledger.phase`` is ``backward``; this call consumes that reference)."""
        self.slots[id(out)] = grad
        for region in reversed(self.regions):
            replayable = region.fn is not None and not region.recomputed
            if replayable and self.recompute is Recompute.AT_REGION:
                self._recompute(region)
            for n in reversed(region.nodes):
                if replayable and n.nsaved and not region.recomputed:
                    self._recompute(region)
                self._run(n)
            self.drop(*region.held)  # a checkpoint's inputs die with its nodes
            region.held = []
        self.drop(*self.leaves.values())  # a leaf's .grad dies with the graph

    def _run(self, n: Node) -> None:
        gouts = [self.slots.pop(id(o), None) for o in n.outs]
        if all(g is None for g in gouts):
            self.drop(*n.saved)
            n.saved = []
            return
        grads = n.bw(self, gouts)
        self.drop(*n.saved)
        n.saved = []
        self.drop(*gouts)
        for t, g in zip(n.ins, grads, strict=True):
            if g is None:
                continue
            if t is None or not t.rg:
                self.drop(g)
            else:
                self._route(t, g)

    def _route(self, t: Tensor, g: Tensor) -> None:
        """Deliver gradient ``g`` to ``t``: cast to t's dtype, then a leaf's ``.grad``, a
        parameter's AccumulateGrad or the InputBuffer of the node that made ``t``."""
        if g.item != t.item:  # engine.cpp validate_outputs: grad.to(input dtype)
            cast = self.new(g.numel, t.item)
            self.drop(g)
            g = cast
        if id(t) in self.leaves:  # AccumulateGrad of a leaf activation
            if self.leaves[id(t)] is None:
                self.leaves[id(t)] = g
            else:
                self.drop(g)
            return
        if t.param is not None:
            self._accumulate(t.param, g)
            return
        old = self.slots.get(id(t))
        if old is None:
            self.slots[id(t)] = g
            return
        merged = self.new(t.numel, t.item)  # InputBuffer::add: old + new, out of place (measured)
        self.drop(old, g)
        self.slots[id(t)] = merged

    def _accumulate(self, p: Param, g: Tensor) -> None:
        if self.grad_sum is GradSum.FIRST_IN_PLACE:
            if p.grad is not None:
                self.drop(g)
            else:  # AccumulateGrad steals the fresh gradient
                p.grad = g
                self.ledger.retype(g.st, "gradients")
            return
        p.arrived += 1
        if p.grad is None:
            p.grad = g
        else:
            merged = self.new(p.numel, p.item)
            self.drop(p.grad, g)
            p.grad = merged
        if p.arrived >= p.uses:
            self.ledger.retype(p.grad.st, "gradients")
