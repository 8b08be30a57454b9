"""The step tape: one allocation ledger and one autograd replay, shared by every step simulator.

Estimate stage; pure arithmetic (no torch, no I/O). A simulator (the decoder in activations.py,
the encoders in encoders.py) writes its model's forward out op by op with the ops below; each op
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

# --------------------------------------------------------------------------------------------
# Constants (each with where it comes from)
# --------------------------------------------------------------------------------------------

ALLOC_GRANULE_BYTES = 512
"""Every CUDA caching-allocator block is a multiple of 512 bytes (c10/cuda/CUDACachingAllocator.cpp
``kMinBlockSize``); torch 2.13 ``MemTracker`` rounds each storage the same way on cuda."""

FP32, HALF, INT64, BOOL = 4, 2, 8, 1
"""Element sizes in bytes: float32; bfloat16/float16; int64 ids and RNG state; bool masks."""

EFFICIENT_LSE_ROUND = 32
"""Memory-efficient attention's logsumexp is [b, nh, ceil(s/32)*32] fp32
(torch/_meta_registrations.py ``meta__scaled_dot_product_efficient_attention``)."""

FLASH_RNG_TENSORS = 2
"""sdpa flash saves ``rng_state`` (2 x uint64) and an ``unused`` 0-dim uint64 for backward
(``_scaled_dot_product_flash_attention``); memory-efficient saves ``philox_seed`` and
``philox_offset`` (two 0-dim int64). One 512-byte block each."""

FLASH_BWD_SEQ_ROUND = 128
"""FlashAttention-2 backward rounds the query length to a multiple of 128 for ``dq_accum`` and
``softmax_d`` (flash_attn ``mha_bwd``: ``seqlen_q_rounded = round_multiple(seqlen_q, 128)``; the
same code is vendored in torch aten/src/ATen/native/transformers/cuda/flash_attn/flash_api.cpp)."""

FLASH_BWD_HEAD_ROUND = 32
"""... and the head dim to a multiple of 32 (``head_size_rounded``, head dims <= 192; 256 above)."""

CATEGORIES = ("activations", "temporaries", "gradients")


def block_bytes(nbytes: int) -> int:
    """Bytes one storage of ``nbytes`` occupies (0 stays 0: empty tensors own no block)."""
    return 0 if nbytes <= 0 else -(-nbytes // ALLOC_GRANULE_BYTES) * ALLOC_GRANULE_BYTES


def flash_backward_workspace(
    b: int, s: int, heads: int, kv_heads: int, head_dim: int, item: int
) -> list[tuple[int, int]]:
    """Scratch tensors (elements, bytes per element) FlashAttention-2's backward allocates besides
    dq/dk/dv (flash_attn ``mha_bwd``, vendored in torch's flash_api.cpp): ``dq_accum`` fp32
    [b, ceil128(s), nh, ceil32(hd)], ``softmax_d`` fp32 [b, nh, ceil128(s)] and, under GQA,
    ``dk_expanded`` / ``dv_expanded`` [b, s, nh, hd] before they are summed over each group. A meta
    kernel shows none of them, so the tracer cannot."""
    srow = -(-s // FLASH_BWD_SEQ_ROUND) * FLASH_BWD_SEQ_ROUND
    hdr = -(-head_dim // FLASH_BWD_HEAD_ROUND) * FLASH_BWD_HEAD_ROUND if head_dim <= 192 else 256
    out = [(b * srow * heads * hdr, FP32), (b * heads * srow, FP32)]
    if kv_heads != heads:
        out += [(b * s * heads * head_dim, item)] * 2
    return out


# --------------------------------------------------------------------------------------------
# The ledger
# --------------------------------------------------------------------------------------------


class Ledger:
    """Live bytes by category, with a reference count per storage and a peak per phase."""

    def __init__(self) -> None:
        self._size: dict[int, int] = {}
        self._cat: dict[int, str] = {}
        self._refs: dict[int, int] = {}
        self._next = 0
        self.now = dict.fromkeys(CATEGORIES, 0)
        self.total = 0
        self.phase = "forward"
        self.peaks: dict[str, tuple[int, dict[str, int]]] = {}

    def alloc(self, nbytes: int, cat: str) -> int | None:
        """A new storage of ``nbytes`` (rounded to the granule) with one reference; None (and no
        new peak) for an empty one."""
        size = block_bytes(nbytes)
        if size == 0:
            return None
        sid, self._next = self._next, self._next + 1
        self._size[sid], self._cat[sid], self._refs[sid] = size, cat, 1
        self.now[cat] += size
        self.total += size
        self.tick()
        return sid

    def ref(self, sid: int | None) -> None:
        if sid is not None:
            self._refs[sid] += 1

    def unref(self, sid: int | None) -> None:
        if sid is None:
            return
        self._refs[sid] -= 1
        if self._refs[sid] == 0:
            size = self._size.pop(sid)
            self.now[self._cat.pop(sid)] -= size
            self.total -= size
            del self._refs[sid]

    def retype(self, sid: int | None, cat: str) -> None:
        if sid is not None:
            self.now[self._cat[sid]] -= self._size[sid]
            self.now[cat] += self._size[sid]
            self._cat[sid] = cat

    def tick(self) -> None:
        """Record the current total as the phase peak if it is at least as large."""
        best = self.peaks.get(self.phase)
        if best is None or self.total >= best[0]:
            self.peaks[self.phase] = (self.total, dict(self.now))

    def peak(self, phase: str) -> dict[str, int]:
        """Bytes by category at ``phase``'s peak (zeros for a phase that never allocated)."""
        return self.peaks.get(phase, (0, dict.fromkeys(CATEGORIES, 0)))[1]


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Param:
    """One parameter tensor (its bytes are model states, not on the ledger) and its ``.grad``."""

    name: str
    numel: int
    item: int
    trainable: bool
    grad: Tensor | None = None
    uses: int = 0  # autograd edges into its AccumulateGrad (2 for a tied embedding / lm_head)
    arrived: int = 0


@dataclass(eq=False)
class Tensor:
    """A tensor: elements, element size, requires-grad, its storage on the ledger (``None`` for
    parameters and tensors that own no bytes) and, for a parameter, its record."""

    numel: int
    item: int
    rg: bool
    st: int | None = None
    param: Param | None = None

    @property
    def nbytes(self) -> int:
        return self.numel * self.item


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
    """When a checkpoint region is replayed and where the replay stops. The decoder and the
    encoders were each matched to their traces with one of these; they differ in a region's last
    few ops and in a region that saved nothing (docs/activations.md, "Checkpointing")."""

    AT_UNPACK = "unpack"
    """torch.utils.checkpoint as it runs: replay when backward first unpacks a saved tensor, stop
    once the last one is packed (``_checkpoint_early_stop``); a region that saved nothing holds
    nothing and is never replayed (the encoders)."""
    AT_REGION = "region"
    """Replay when backward reaches the region, even one that saved nothing (its inputs are held
    until then), and stop where the replayed code calls ``Tape.early_stop`` (decoder layers: before
    the last residual add)."""


class GradSum(Enum):
    """How a parameter used by several ops gets its ``.grad``."""

    AFTER_ALL_USES = "after-all-uses"
    """AccumulateGrad runs once every use has delivered; a second gradient is summed out of place
    first (a tied embedding and lm_head; measured) and the sum becomes ``.grad`` (the decoder)."""
    FIRST_IN_PLACE = "first-in-place"
    """The first gradient becomes ``.grad`` at once, later ones add into it in place (a tower's
    weights used once per chunk of crops; the encoders)."""


# --------------------------------------------------------------------------------------------
# The tape: forward ops that allocate and record, and the backward engine
# --------------------------------------------------------------------------------------------


class Tape:
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

    # ---- autocast -----------------------------------------------------------------------------
    def cast(self, x: Tensor, item: int) -> Tensor:
        """``x.to(dtype)``: a copy when the dtype changes; ToCopyBackward casts the gradient back."""
        if x.item == item:
            return self.alias(x)
        out = self.new(x.numel, item, x.rg)
        self.node([out], [x], [], lambda s, g, x=x: [s.grad(x)])
        return out

    def ac(self, x: Tensor) -> Tensor:
        """An activation entering a lower-precision op under autocast (cast at every use)."""
        return self.cast(x, self.compute_item) if self.autocast else self.alias(x)

    def cast_weight(self, w: Tensor | None, cacheable: bool = True) -> Tensor | None:
        """A weight entering a lower-precision op. Autocast caches the cast of an fp32 leaf that
        requires grad until the region ends (aten/src/ATen/autocast_mode.cpp ``cached_cast``:
        ``arg.is_leaf() && arg.requires_grad()``); a frozen one, or a view, is cast at every use."""
        if w is None:
            return None
        if not self.autocast or w.item == self.compute_item:
            return self.alias(w)
        if cacheable and w.rg and w.param is not None and self.cache is not None:
            hit = self.cache.get(id(w))
            if hit is None:
                hit = self.cast(w, self.compute_item)
                self.cache[id(w)] = hit
            return self.alias(hit)
        return self.cast(w, self.compute_item)

    def end_autocast(self) -> None:
        """Leaving the outermost autocast region clears the weight cache (``clear_cache``)."""
        if self.cache is not None:
            self.drop(*self.cache.values())
            self.cache = {}

    # ---- ops ----------------------------------------------------------------------------------
    def matmul(self, a: Tensor, b: Tensor, out_numel: int, bias: Tensor | None = None) -> Tensor:
        """``a @ b`` (mm, bmm; addmm with ``bias``): saves a if b requires grad and b if a does
        (``mm_mat1_backward`` / ``mm_mat2_backward``), packed before the kernel runs (an early
        stopped recomputation never allocates the output); backward allocates each input's
        gradient (the bias's is ``grad.sum(0)``)."""
        out = Tensor(out_numel, a.item, a.rg or b.rg or (bias is not None and bias.rg))

        def bw(s: Tape, g: list[Tensor | None], a=a, b=b, bias=bias) -> list[Tensor | None]:
            return [s.grad(t) if t is not None and t.rg else None for t in (a, b, bias)]

        self.node([out], [a, b, bias], [a if b.rg else None, b if a.rg else None], bw)
        return self.materialize(out)

    def linear(self, x: Tensor, w: Tensor, b: Tensor | None, out_f: int, contiguous: bool = True,
               cacheable: bool = True) -> Tensor:
        """``F.linear``: addmm on a contiguous input; a non-contiguous 3-D input is reshaped
        (copied) for ``mm`` and the bias added out of place (``at::matmul`` folding). Autocast
        casts the arguments right to left: bias, weight, input (seen in every trace)."""
        rows = x.numel // (w.numel // out_f)
        bc = self.cast_weight(b, cacheable)
        wc = self.cast_weight(w, cacheable)
        xc = self.ac(x)
        copied = None
        if not contiguous:  # the cast copy stays referenced until F.linear returns
            copied, xc = xc, self.clone(xc)
        fused = b is not None and contiguous
        out = self.matmul(xc, wc, rows * out_f, bc if fused else None)
        self.drop(xc, wc)
        if b is not None and not fused:
            biased = self.add(out, bc)
            self.drop(out)
            out = biased
        self.drop(bc, copied)
        return out

    def mul(self, a: Tensor, b: Tensor | None, out_numel: int | None = None) -> Tensor:
        """Elementwise ``a * b`` (``b`` None: a Python scalar). Saves each operand the other
        needs; a broadcast operand's gradient is reduced (sum_to_size) from a full-size product."""
        item = a.item if b is None else max(a.item, b.item)  # bf16 * fp32 promotes to fp32
        numel = out_numel if out_numel is not None else max(a.numel, b.numel if b else 0)
        out = self.new(numel, item, a.rg or (b is not None and b.rg))

        def bw(s: Tape, g: list[Tensor | None], a=a, b=b, numel=numel, item=item) -> list[Tensor | None]:
            res: list[Tensor | None] = []
            for x in (a, b):
                if x is None or not x.rg:
                    res.append(None)
                    continue
                full = s.new(numel, item)
                if x.numel < numel:  # sum_to_size of a broadcast operand
                    small = s.new(x.numel, item)
                    s.drop(full)
                    full = small
                res.append(full)
            return res

        self.node([out], [a, b], [b if a.rg else None, a if (b is not None and b.rg) else None], bw)
        return out

    def add(self, a: Tensor, b: Tensor) -> Tensor:
        """``a + b`` with type promotion; saves nothing. A broadcast operand's gradient is reduced
        to its shape (``validate_outputs``: ``sum_to``); the engine casts each to its dtype."""
        out = self.new(max(a.numel, b.numel), max(a.item, b.item), a.rg or b.rg)

        def bw(s: Tape, g: list[Tensor | None], a=a, b=b) -> list[Tensor | None]:
            (go,) = g
            return [None if not t.rg else s.new(t.numel, go.item) if t.numel < go.numel else s.alias(go)
                    for t in (a, b)]

        self.node([out], [a, b], [], bw)
        return out

    def unary_saving_input(self, x: Tensor) -> Tensor:
        """silu / gelu and the like: save their input; backward allocates one gradient
        (``silu_backward`` / ``gelu_backward``)."""
        out = self.new(x.numel, x.item, x.rg)
        self.node([out], [x], [x], lambda s, g, x=x: [s.grad(x)])
        return out

    def clone(self, x: Tensor) -> Tensor:
        """``contiguous()`` / ``reshape`` copy of a strided view (or ``cat`` with an empty tensor);
        backward passes the gradient on."""
        out = self.new(x.numel, x.item, x.rg)
        self.node([out], [x], [], lambda s, g: [s.alias(g[0])])
        return out

    def repeat(self, x: Tensor, numel: int) -> Tensor:
        """``repeat`` / ``expand().reshape()`` to ``numel`` elements: a copy that saves nothing;
        backward sums the copies into one new gradient of x's shape."""
        out = self.new(numel, x.item, x.rg)
        self.node([out], [x], [], lambda s, g, x=x: [s.grad(x)])
        return out

    def embedding(self, w: Tensor, numel: int) -> Tensor:
        """A lookup of ``numel`` elements in table ``w``: indices are a buffer (saved, no new
        block); ``embedding_dense_backward`` allocates a dense table-sized gradient."""
        return self.repeat(w, numel)

    def softmax(self, x: Tensor, out_item: int) -> Tensor:
        """``softmax`` producing ``out_item`` (an fp32 ``dtype=`` or CUDA autocast's fp32 list
        casts a half input first); saves its output; backward: ``_softmax_backward_data``."""
        xi = self.cast(x, out_item)
        out = self.new(x.numel, out_item, xi.rg)
        self.node([out], [xi], [out], lambda s, g, xi=xi: [s.grad(xi)])
        self.drop(xi)
        return out

    def split(self, x: Tensor, parts: int) -> list[Tensor]:
        """``x.chunk(parts)``: views (of a parameter they are not leaves, so autocast does not
        cache their casts); SplitBackward concatenates the parts' gradients into one new tensor."""
        outs = [Tensor(x.numel // parts, x.item, x.rg, self.alias(x).st) for _ in range(parts)]
        self.node(outs, [x], [], lambda s, g, x=x: [s.grad(x)])
        return outs

    def slice(self, x: Tensor, numel: int) -> Tensor:
        """``x[..., a:b]``: a view; SliceBackward allocates a zero tensor of x's full size."""
        out = Tensor(numel, x.item, x.rg, self.alias(x).st)
        self.node([out], [x], [], lambda s, g, x=x: [s.new(x.numel, g[0].item)])
        return out

    def cat(self, xs: list[Tensor]) -> Tensor:
        """``torch.cat``: a new tensor; CatBackward hands out views of the gradient."""
        out = self.new(sum(x.numel for x in xs), xs[0].item, any(x.rg for x in xs))
        self.node([out], list(xs), [], lambda s, g: [s.view(g[0], x.numel) for x in xs])
        return out

    def layer_norm(self, x: Tensor, w: Tensor, b: Tensor, rows: int) -> Tensor:
        """``native_layer_norm``: CUDA autocast runs it in fp32 (fp32 op list); saves its input
        and the fp32 mean / rstd [rows, 1]; backward returns input, weight and bias gradients."""
        xi = self.cast(x, FP32) if self.autocast else self.alias(x)
        out = self.new(xi.numel, xi.item, xi.rg or w.rg)
        mean, rstd = self.new(rows, FP32), self.new(rows, FP32)
        self.node([out], [xi, w, b], [xi, mean, rstd],
                  lambda s, g, xi=xi: [s.grad(t) if t.rg else None for t in (xi, w, b)])
        self.drop(xi, mean, rstd)
        return out

    def conv(self, x: Tensor, w: Tensor, b: Tensor, out_numel: int) -> Tensor:
        """Convolution (autocast lower precision). ConvolutionBackward0 saves input and weight
        whenever any input requires grad (one formula for all three gradients in derivatives.yaml);
        ``convolution_backward`` allocates the input, weight and bias gradients in one call."""
        bc, wc, xc = self.cast_weight(b), self.cast_weight(w), self.ac(x)
        out = Tensor(out_numel, self.compute_item, xc.rg or wc.rg)
        self.node([out], [xc, wc, bc], [xc, wc],
                  lambda s, g, xc=xc, wc=wc, bc=bc: [s.grad(t) if t.rg else None for t in (xc, wc, bc)])
        self.materialize(out)
        self.drop(xc, wc, bc)
        return out

    def attention(self, q: Tensor, k: Tensor, v: Tensor, lse_numel: int, bias: Tensor | None = None,
                  workspace: Sequence[tuple[int, int]] = ()) -> Tensor:
        """A fused attention kernel (sdpa's flash or memory-efficient kernel, FlashAttention-2):
        saves q, k, v, the output (laid out like the query: ``empty_like(q)``), an fp32 logsumexp
        of ``lse_numel``, an additive ``bias`` if any and the RNG state (``FLASH_RNG_TENSORS``).
        Backward: dq, dk, dv, plus ``workspace`` (elements, item) scratch alive meanwhile."""
        out = self.new(q.numel, q.item, q.rg or k.rg or v.rg)
        lse = self.new(lse_numel, FP32)
        rng = [self.new(1, INT64) for _ in range(FLASH_RNG_TENSORS)]

        def bw(s: Tape, g: list[Tensor | None], q=q, k=k, v=v) -> list[Tensor | None]:
            scratch = [s.new(numel, item) for numel, item in workspace]
            grads = [s.grad(q), s.grad(k), s.grad(v)]
            s.drop(*scratch)
            return grads

        self.node([out], [q, k, v], [q, k, v, out, lse, bias, *rng], bw)
        self.drop(lse, *rng)
        return out
