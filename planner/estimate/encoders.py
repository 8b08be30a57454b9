"""Activation memory of MiniCPM's encoders: SigLIP vision tower, perceiver resampler, Whisper encoder.

Part of the estimate stage; pure arithmetic (no torch, no I/O). Each encoder's forward is written
out op by op as the real code runs it (transformers 5.24 ``models/siglip/modeling_siglip.py``,
``models/whisper/modeling_whisper.py``; MiniCPM-V 2.6 / o 2.6 ``resampler.py`` with torch 2.13
``F.multi_head_attention_forward``) and replayed on a byte ledger: every op allocates its outputs,
records what autograd saves, and Python references die where the real code drops them. The
backward then runs the recorded nodes in reverse creation order (the autograd engine's order on
one device), allocating each node's gradients, releasing what it saved, casting gradients to the
input's dtype and accumulating gradients of tensors used twice. Non-reentrant checkpointing
recomputes a layer when backward first needs one of its saved tensors and stops after the last
one (``torch.utils.checkpoint`` early stop). Under autocast, trainable fp32 weights are cast once
and cached until the autocast region ends; frozen ones are cast at every use.

The closed forms these replays reduce to, their sources and the comparison with a traced step
(``planner.trace``, tests/test_encoders_vs_trace.py) are in docs/encoders.md.

Conventions: C = crops (or audio pieces) in one encoder call, L = patches per crop (or encoder
positions per piece), N = C*L, D = hidden, I = MLP width, h = heads, S = C*h*L*L attention scores.
Every storage is rounded up to 512 bytes (``ALLOC_GRANULE_BYTES``) as the CUDA caching allocator
and ``MemTracker`` do.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

ALLOC_GRANULE_BYTES = 512
"""CUDA caching-allocator block granularity (c10/cuda/CUDACachingAllocator.cpp ``kMinBlockSize``)."""

FP32, HALF, INT64, BOOL = 4, 2, 8, 1
"""Element sizes in bytes."""

VISION_BATCH_SIZE = 16
"""Crops per vision-tower call: MiniCPM-V 2.6 / o 2.6 ``get_vllm_embedding`` (``vision_batch_size``)."""

EFFICIENT_LSE_ROUND = 32
"""Memory-efficient sdpa's logsumexp is [b, h, ceil(L/32)*32] fp32 (torch/_meta_registrations.py
``meta__scaled_dot_product_efficient_attention``)."""

RESAMPLER_MAX_GRID = 70
"""MiniCPM resampler ``max_size=(70, 70)``: its 2-D sin-cos table is [70, 70, D]; a crop's slice
``pos_embed[:h, :w]`` is copied by ``reshape`` whenever ``w < 70``, i.e. always in practice."""

ATTENTIONS = ("eager", "sdpa")
PHASES = ("forward", "backward")


# --------------------------------------------------------------------------------------------
# Public result
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncoderMemory:
    """Bytes one encoder call adds beyond the model states (weights, gradients' steady state,
    optimizer states), by phase.

    Attributes:
        forward_activations: tensors born in the forward and alive at the forward peak: what is
            saved for backward so far, the transient at the peak (usually one layer's attention
            scores), the autocast weight cache, and earlier chunks' outputs.
        forward_temporaries: always 0 (the forward allocates only activations); kept so both
            phases read alike.
        held_for_backward: activations alive once the forward is done and the encoder's output
            has gone to its consumer (the consumer's own saved copy is the consumer's): what
            backward starts from. 0 for a frozen encoder whose input needs no gradient.
        backward_activations: forward-born and recomputed tensors alive at the backward peak.
        backward_temporaries: gradients of activations alive at the backward peak, including
            the incoming gradient of the output (allocated by the consumer's backward).
        backward_gradients: this encoder's parameter gradients alive at its backward peak.
        autocast_cache: under amp, bf16 copies of trainable fp32 weights that autocast keeps
            until the *model's* forward ends (MiniCPM: after the LLM's forward and loss) beyond
            those already in ``held_for_backward``; 0 without autocast or without trained
            weights. With checkpointing this is about 2 bytes per trainable parameter.
    """

    forward_activations: int
    forward_temporaries: int
    held_for_backward: int
    backward_activations: int
    backward_temporaries: int
    backward_gradients: int
    autocast_cache: int = 0

    @property
    def forward_peak_bytes(self) -> int:
        """Activations + temporaries at the forward peak."""
        return self.forward_activations + self.forward_temporaries

    @property
    def backward_peak_bytes(self) -> int:
        """Activations + temporaries + parameter gradients at the backward peak."""
        return self.backward_activations + self.backward_temporaries + self.backward_gradients

    @property
    def peak_bytes(self) -> int:
        """The larger of the two phase peaks."""
        return max(self.forward_peak_bytes, self.backward_peak_bytes)


# --------------------------------------------------------------------------------------------
# Ledger and a tiny autograd
# --------------------------------------------------------------------------------------------


def _round(nbytes: int) -> int:
    """Bytes one storage occupies (empty tensors own no block)."""
    return 0 if nbytes <= 0 else -(-nbytes // ALLOC_GRANULE_BYTES) * ALLOC_GRANULE_BYTES


class _Ledger:
    """Live bytes by category with a reference count per storage and a peak per phase (the last
    of equal peaks wins, as in the tracer)."""

    CATS = ("activations", "temporaries", "gradients")

    def __init__(self) -> None:
        self.size: dict[int, int] = {}
        self.cat: dict[int, str] = {}
        self.refs: dict[int, int] = {}
        self.next = 0
        self.now = dict.fromkeys(self.CATS, 0)
        self.phase = "forward"
        self.peaks: dict[str, tuple[int, dict[str, int]]] = {}

    def alloc(self, nbytes: int, cat: str) -> int | None:
        size = _round(nbytes)
        if size == 0:
            return None
        sid, self.next = self.next, self.next + 1
        self.size[sid], self.cat[sid], self.refs[sid] = size, cat, 1
        self.now[cat] += size
        self.tick()
        return sid

    def ref(self, sid: int | None) -> None:
        if sid is not None:
            self.refs[sid] += 1

    def unref(self, sid: int | None) -> None:
        if sid is None:
            return
        self.refs[sid] -= 1
        if self.refs[sid] == 0:
            self.now[self.cat.pop(sid)] -= self.size.pop(sid)
            del self.refs[sid]

    def retype(self, sid: int | None, cat: str) -> None:
        if sid is not None:
            self.now[self.cat[sid]] -= self.size[sid]
            self.now[cat] += self.size[sid]
            self.cat[sid] = cat

    def tick(self) -> None:
        total = sum(self.now.values())
        best = self.peaks.get(self.phase)
        if best is None or total >= best[0]:
            self.peaks[self.phase] = (total, dict(self.now))


@dataclass(eq=False)
class _T:
    """A tensor: elements, element size, requires-grad, storage (None: a parameter or empty)."""

    numel: int
    item: int
    rg: bool
    sid: int | None = None
    param: bool = False


@dataclass(eq=False)
class _Node:
    outs: list[_T]
    ins: list[_T | None]
    saved: list[_T]
    bw: Callable[[list[_T | None]], list[_T | None]]
    nsaved: int = 0  # tensors it saved in the original forward (placeholders under checkpoint)
    region: _Region | None = None


@dataclass(eq=False)
class _Region:
    """One non-reentrant checkpoint: its input (held until its nodes are done), the function that
    replays it, and its nodes."""

    fn: Callable[[_T], _T]
    x: _T
    extra: tuple[_T, ...] = ()  # other tensor arguments (an attention mask), held alike
    nodes: list[_Node] = field(default_factory=list)
    recomputed: bool = False


class _Sim:
    """Forward ops that allocate on the ledger and record autograd nodes; the backward engine."""

    def __init__(self, *, amp: bool, module_item: int) -> None:
        self.led = _Ledger()
        self.amp = amp
        self.md = module_item  # parameter / buffer element size
        self.cd = HALF if amp else module_item  # compute element size of matmuls
        self.nodes: list[_Node] = []
        self.cache: dict[int, _T] | None = {} if amp else None  # autocast weight cast cache
        self.region: _Region | None = None  # checkpointed region being run for the first time
        self.replay: list[_T] | None = None  # tensors a recomputation saved, in packing order
        self.replay_target = 0  # early stop once this many are saved
        self.stopped = False
        self.held = 0
        self.cache_only = 0
        self.slots: dict[int, _T] = {}
        self.grads: dict[int, _T] = {}  # id(param tensor) -> its .grad

    # ---- tensors ----------------------------------------------------------------------------
    def new(self, numel: int, item: int, rg: bool = False) -> _T:
        return self.materialize(_T(numel, item, rg))

    def materialize(self, t: _T) -> _T:
        """Give ``t`` its storage (none once a recomputation has stopped early)."""
        if not self.stopped:
            cat = "temporaries" if self.led.phase == "backward" and self.replay is None else "activations"
            t.sid = self.led.alloc(t.numel * t.item, cat)
        return t

    def param(self, numel: int, trainable: bool, item: int | None = None) -> _T:
        return _T(numel, self.md if item is None else item, trainable, None, param=True)

    def alias(self, t: _T | None) -> _T | None:
        if t is not None:
            self.led.ref(t.sid)
        return t

    def drop(self, *ts: _T | None) -> None:
        for t in ts:
            if t is not None:
                self.led.unref(t.sid)

    def node(self, outs: list[_T], ins: list[_T | None], saved: list[_T | None], bw) -> None:  # noqa: ANN001
        if not any(t is not None and t.rg for t in ins):
            return
        real = [t for t in saved if t is not None and t.sid is not None]
        if self.replay is not None:  # recomputation: keep what is packed, in order
            for t in real:
                self.led.ref(t.sid)
            self.replay.extend(real)
            self.stopped = len(self.replay) >= self.replay_target
            return
        n = _Node(outs, ins, [], bw, nsaved=len(real), region=self.region)
        if self.region is None:
            n.saved = real
            for t in real:
                self.led.ref(t.sid)
        else:  # under checkpoint the saved tensors are placeholders
            self.region.nodes.append(n)
        self.nodes.append(n)

    def grad_like(self, t: _T) -> _T:
        return self.new(t.numel, t.item)

    # ---- autocast -----------------------------------------------------------------------------
    def cast(self, x: _T, item: int) -> _T:
        """``x.to(dtype)``: a copy when the dtype changes; ToCopyBackward casts the gradient back."""
        if x.item == item:
            return self.alias(x)
        out = self.new(x.numel, item, x.rg)
        self.node([out], [x], [], lambda g, x=x: [self.grad_like(x)])
        return out

    def ac(self, x: _T) -> _T:
        """An input of a lower-precision op under autocast (cast at every use)."""
        return self.cast(x, self.cd) if self.amp else self.alias(x)

    def ac_weight(self, w: _T | None, cacheable: bool = True) -> _T | None:
        """A weight entering a lower-precision op. Autocast caches the cast of an fp32 leaf that
        requires grad until the region ends (aten/src/ATen/autocast_mode.cpp ``cached_cast``)."""
        if w is None:
            return None
        if not self.amp or w.item == self.cd:
            return self.alias(w)
        if cacheable and w.rg and w.param and self.cache is not None:
            hit = self.cache.get(id(w))
            if hit is None:
                hit = self.cast(w, self.cd)
                self.cache[id(w)] = hit
            return self.alias(hit)
        return self.cast(w, self.cd)

    def end_autocast(self) -> None:
        """Leaving the outermost autocast region clears the cache."""
        if self.cache is not None:
            self.drop(*self.cache.values())
            self.cache = {}

    # ---- ops --------------------------------------------------------------------------------
    def linear(self, x: _T, w: _T, b: _T | None, out_f: int, contiguous: bool = True,
               cacheable: bool = True) -> _T:
        """``F.linear``: addmm on a contiguous input; a non-contiguous 3-D input is reshaped
        (copied) for ``mm`` and the bias added out of place (``at::matmul`` folding)."""
        rows = x.numel // (w.numel // out_f)
        # autocast casts the arguments right to left: bias, weight, input (seen in every trace)
        bc = self.ac_weight(b, cacheable)
        wc = self.ac_weight(w, cacheable)
        xc = self.ac(x)
        cast = None
        if not contiguous:  # the cast copy stays referenced until F.linear returns
            cast, xc = xc, self.clone(xc)
        # Inputs are packed for backward before the kernel runs (an early-stopped recomputation
        # never allocates this output), hence the node first.
        out = _T(rows * out_f, self.cd, xc.rg or wc.rg or (b is not None and b.rg))
        fused = b is not None and contiguous

        def bw(g, xc=xc, wc=wc, bc=bc if fused else None):  # noqa: ANN001, ANN202
            gx = self.grad_like(xc) if xc.rg else None
            gw = self.grad_like(wc) if wc.rg else None
            gb = self.grad_like(bc) if bc is not None and bc.rg else None
            return [gx, gw, gb]

        self.node([out], [xc, wc, bc if fused else None], [xc if wc.rg else None, wc if xc.rg else None], bw)
        self.materialize(out)
        self.drop(xc, wc)
        if b is not None and not fused:
            biased = self.add(out, bc)
            self.drop(out)
            out = biased
        self.drop(bc, cast)
        return out

    def conv(self, x: _T, w: _T, b: _T, out_numel: int) -> _T:
        """Convolution (autocast lower precision). ConvolutionBackward0 saves input and weight
        whenever any input requires grad (one formula for all three gradients in derivatives.yaml);
        ``convolution_backward`` allocates the input, weight and bias gradients in one call."""
        bc, wc, xc = self.ac_weight(b), self.ac_weight(w), self.ac(x)
        out = _T(out_numel, self.cd, xc.rg or wc.rg)

        def bw(g, xc=xc, wc=wc, bc=bc):  # noqa: ANN001, ANN202
            return [self.grad_like(t) if t.rg else None for t in (xc, wc, bc)]

        self.node([out], [xc, wc, bc], [xc, wc], bw)
        self.materialize(out)
        self.drop(xc, wc, bc)
        return out

    def layer_norm(self, x: _T, w: _T, b: _T, rows: int) -> _T:
        """``native_layer_norm``: CUDA autocast runs it in fp32 (fp32 op list); saves its input
        and the fp32 mean / rstd [rows, 1]; backward returns input, weight and bias gradients."""
        xi = self.cast(x, FP32) if self.amp else self.alias(x)
        rg = xi.rg or w.rg
        out = self.new(xi.numel, xi.item, rg)
        mean, rstd = self.new(rows, FP32), self.new(rows, FP32)

        def bw(g, xi=xi):  # noqa: ANN001, ANN202
            return [self.grad_like(xi) if xi.rg else None, self.grad_like(w) if w.rg else None,
                    self.grad_like(b) if b.rg else None]

        self.node([out], [xi, w, b], [xi, mean, rstd], bw)
        self.drop(xi, mean, rstd)
        return out

    def gelu(self, x: _T) -> _T:
        out = self.new(x.numel, x.item, x.rg)
        self.node([out], [x], [x], lambda g, x=x: [self.grad_like(x)])
        return out

    def add(self, a: _T, b: _T) -> _T:
        """``a + b`` with type promotion; saves nothing. A broadcast operand's gradient is reduced
        to its shape (``validate_outputs``: ``sum_to``)."""
        out = self.new(max(a.numel, b.numel), max(a.item, b.item), a.rg or b.rg)

        def bw(g, a=a, b=b):  # noqa: ANN001, ANN202
            res: list[_T | None] = []
            for t in (a, b):
                if not t.rg:
                    res.append(None)
                elif t.numel < g[0].numel:
                    res.append(self.new(t.numel, g[0].item))
                else:
                    res.append(self.alias(g[0]))
            return res

        self.node([out], [a, b], [], bw)
        return out

    def mul_scalar(self, x: _T) -> _T:
        """``x * python_scalar``: a new tensor; backward multiplies the gradient (a new tensor)."""
        out = self.new(x.numel, x.item, x.rg)
        self.node([out], [x], [], lambda g, x=x: [self.grad_like(x)])
        return out

    def clone(self, x: _T) -> _T:
        """``contiguous()`` / ``reshape`` copy of a strided view; backward passes the gradient."""
        out = self.new(x.numel, x.item, x.rg)
        self.node([out], [x], [], lambda g: [self.alias(g[0])])
        return out

    def bmm(self, a: _T, b: _T, out_numel: int, bias: _T | None = None) -> _T:
        """``bmm`` (``baddbmm`` with ``bias``): saves each operand the other's gradient needs;
        backward computes the second operand's gradient first (derivatives.yaml order)."""
        out = _T(out_numel, a.item, a.rg or b.rg)

        def bw(g, a=a, b=b):  # noqa: ANN001, ANN202
            gb = self.grad_like(b) if b.rg else None
            ga = self.grad_like(a) if a.rg else None
            return [ga, gb]

        self.node([out], [a, b], [a if b.rg else None, b if a.rg else None], bw)
        return self.materialize(out)

    def softmax(self, x: _T, out_item: int) -> _T:
        """``softmax`` producing ``out_item`` (an fp32 ``dtype=`` or CUDA autocast's fp32 list
        casts a half input first); saves its output; backward: ``_softmax_backward_data``."""
        xi = self.cast(x, out_item)
        out = self.new(x.numel, out_item, xi.rg)
        self.node([out], [xi], [out], lambda g, xi=xi: [self.grad_like(xi)])
        self.drop(xi)
        return out

    def embedding(self, w: _T, out_numel: int) -> _T:
        """A position lookup: indices are a buffer (saved, owns no new block); backward:
        ``embedding_dense_backward`` allocates a dense table-sized gradient."""
        out = self.new(out_numel, w.item, w.rg)
        self.node([out], [w], [], lambda g, w=w: [self.grad_like(w)])
        return out

    def repeat(self, x: _T, times: int) -> _T:
        out = self.new(x.numel * times, x.item, x.rg)
        self.node([out], [x], [], lambda g, x=x: [self.grad_like(x)])
        return out

    def split(self, w: _T, parts: int) -> list[_T]:
        """``w.chunk(parts)`` of a parameter: views (not leaves, so autocast does not cache their
        casts); backward concatenates the parts' gradients into one new tensor."""
        outs = [_T(w.numel // parts, w.item, w.rg) for _ in range(parts)]
        self.node(outs, [w], [], lambda g, w=w: [self.grad_like(w)])
        return outs

    def cat(self, xs: list[_T]) -> _T:
        """``torch.cat`` along the batch: backward hands out views of the gradient."""
        out = self.new(sum(x.numel for x in xs), xs[0].item, any(x.rg for x in xs))
        self.node([out], list(xs), [], lambda g: [self.alias(g[0]) for _ in xs])
        return out

    def flash(self, q: _T, k: _T, v: _T, lse_numel: int) -> _T:
        """sdpa on a GPU: flash attention for fp16/bf16 without a mask, else memory-efficient
        attention. Saves q, k, v, the output, an fp32 logsumexp and the RNG state (two 0/1-dim
        tensors of one block each); backward returns dq, dk, dv (kernel workspaces unmodelled)."""
        out = self.new(q.numel, q.item, q.rg or k.rg or v.rg)
        lse = self.new(lse_numel, FP32)
        rng = [self.new(2, INT64), self.new(1, INT64)]
        self.node([out], [q, k, v], [q, k, v, out, lse, *rng],
                  lambda g, q=q, k=k, v=v: [self.grad_like(t) if t.rg else None for t in (q, k, v)])
        self.drop(lse, *rng)
        return out

    # ---- checkpointing ------------------------------------------------------------------------
    def checkpoint(self, fn: Callable[[_T], _T], x: _T, enabled: bool, extra: tuple[_T | None, ...] = ()) -> _T:
        """Run ``fn(x)`` under non-reentrant checkpointing when ``enabled``: the checkpoint holds
        its tensor arguments (``x`` and ``extra``) until the region's backward is done."""
        if not enabled or self.region is not None:
            return fn(x)
        region = _Region(fn, self.alias(x), tuple(self.alias(t) for t in extra if t is not None))
        self.region = region
        out = fn(x)
        self.region = None
        if not region.nodes:
            self.drop(region.x, *region.extra)
        return out

    def _recompute(self, region: _Region) -> None:
        """Replay the region under a fresh autocast cache; saved tensors are matched to the
        original nodes by packing order, as torch.utils.checkpoint does."""
        self.replay, self.stopped = [], False
        self.replay_target = sum(n.nsaved for n in region.nodes)
        outer_cache, self.cache = self.cache, ({} if self.amp else None)
        out = region.fn(region.x)
        self.end_autocast()
        self.cache = outer_cache
        packed = iter(self.replay)
        for n in region.nodes:
            n.saved = [next(packed) for _ in range(n.nsaved)]
        self.replay, self.stopped = None, False
        self.drop(out)
        region.recomputed = True

    # ---- backward -----------------------------------------------------------------------------
    def backward(self, out: _T) -> None:
        """Backward from ``out`` given a gradient of its shape and dtype (the consumer's)."""
        self.led.phase = "backward"
        self.slots[id(out)] = self.new(out.numel, out.item)
        remaining: dict[int, int] = {}
        for n in self.nodes:
            if n.region is not None:
                remaining[id(n.region)] = remaining.get(id(n.region), 0) + 1
        for n in reversed(self.nodes):
            r = n.region
            if r is not None and n.nsaved and not r.recomputed:
                self._recompute(r)
            self._run(n)
            if r is not None:
                remaining[id(r)] -= 1
                if remaining[id(r)] == 0:
                    self.drop(r.x, *r.extra)

    def _run(self, n: _Node) -> None:
        gouts = [self.slots.pop(id(o), None) for o in n.outs]
        if all(g is None for g in gouts):
            self.drop(*n.saved)
            n.saved = []
            return
        grads = n.bw(gouts)
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

    def _route(self, t: _T, g: _T) -> None:
        if g.item != t.item:  # engine.cpp validate_outputs: grad.to(input dtype)
            cast = self.new(g.numel, t.item)
            self.drop(g)
            g = cast
        if t.param:
            if id(t) in self.grads:  # a second use accumulates in place
                self.drop(g)
            else:  # AccumulateGrad steals the fresh gradient
                self.grads[id(t)] = g
                self.led.retype(g.sid, "gradients")
            return
        old = self.slots.get(id(t))
        if old is None:
            self.slots[id(t)] = g
        else:  # InputBuffer::add: old + new, out of place
            merged = self.new(t.numel, t.item)
            self.drop(old, g)
            self.slots[id(t)] = merged

    def result(self) -> EncoderMemory:
        fw = self.led.peaks.get("forward", (0, dict.fromkeys(_Ledger.CATS, 0)))[1]
        bw = self.led.peaks.get("backward", (0, dict.fromkeys(_Ledger.CATS, 0)))[1]
        return EncoderMemory(
            forward_activations=fw["activations"],
            forward_temporaries=fw["temporaries"],
            held_for_backward=self.held,
            backward_activations=bw["activations"],
            backward_temporaries=bw["temporaries"],
            backward_gradients=bw["gradients"],
            autocast_cache=self.cache_only,
        )


def _finish(s: _Sim, outs: list[_T], trained_path: bool) -> EncoderMemory:
    """End of the encoder call: the caller concatenates the outputs (MiniCPM ``torch.cat`` of the
    chunks) and hands them on; autocast ends with the model forward; then backward."""
    out = s.cat(outs) if len(outs) > 1 else s.alias(outs[0])
    s.drop(*outs, out)
    before = s.led.now["activations"]
    s.end_autocast()
    s.held = s.led.now["activations"]
    s.cache_only = before - s.held
    if trained_path and out.rg:
        s.backward(out)
    return s.result()


def _check(attn: str, module_dtype_bytes: int, autocast: bool, **counts: int) -> None:
    for name, value in counts.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1; got {value}")
    if attn not in ATTENTIONS:
        raise ValueError(f"attn must be one of {', '.join(ATTENTIONS)}; got {attn!r}")
    if module_dtype_bytes not in (FP32, HALF):
        raise ValueError(f"module_dtype_bytes must be 4 (fp32) or 2 (bf16/fp16); got {module_dtype_bytes}")
    if autocast and module_dtype_bytes != FP32:
        raise ValueError("autocast is modelled over fp32 weights (amp); a bf16 module runs without it")


def _get(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
    if key in cfg:
        return cfg[key]
    if default is None:
        raise ValueError(f"config is missing required field {key!r}")
    return default


# --------------------------------------------------------------------------------------------
# SigLIP vision tower (transformers SiglipVisionModel without the pooling head)
# --------------------------------------------------------------------------------------------


def _attention_eager(s: _Sim, q: _T, k: _T, v: _T, c: int, heads: int, seq: int, mask: _T | None,
                     *, clone_qkv: bool, explicit_fp32: bool) -> tuple[_T, _T]:
    """``eager_attention_forward``; returns (output [N, D] contiguous, the probabilities the
    caller keeps as the unused second output). ``clone_qkv``: q/k/v are [C, h, L, d] transposed
    views of [C, L, h, d] projections, which ``matmul`` copies to fold (C, h) into one batch
    dimension (SigLIP with C > 1; with C = 1 the fold is a view). ``explicit_fp32``: SigLIP's
    ``softmax(dtype=float32).to(query.dtype)``; otherwise (Whisper) a plain softmax, fp32 under
    CUDA autocast's fp32 op list, cast back by the next matmul."""
    n = q.numel
    scores = c * heads * seq * seq
    if clone_qkv:
        qc, kc = s.clone(q), s.clone(k)
    else:
        qc, kc = s.alias(q), s.alias(k)
    raw = s.bmm(qc, kc, scores)
    s.drop(qc, kc)
    w = s.mul_scalar(raw)
    s.drop(raw)
    if mask is not None:
        masked = s.add(w, mask)
        s.drop(w)
        w = masked
    if explicit_fp32:
        p32 = s.softmax(w, FP32)
        p = s.cast(p32, q.item)
        s.drop(w, p32)
        vc = s.clone(v) if clone_qkv else s.alias(v)
        keep = p
    else:
        p32 = s.softmax(w, FP32 if s.amp else w.item)
        s.drop(w)
        p = s.ac(p32)
        vc = s.alias(v)
        keep = p32
    o = s.bmm(p, vc, n)
    if not explicit_fp32:
        s.drop(p)
    s.drop(vc)
    oc = s.clone(o)  # attn_output.transpose(1, 2).contiguous()
    s.drop(o)
    return oc, keep


def _siglip_layer(s: _Sim, x: _T, p: dict[str, _T], dims: tuple[int, ...], attn: str, mask: _T | None) -> _T:
    c, seq, d, inter, heads = dims
    n = c * seq
    h = s.layer_norm(x, p["ln1.w"], p["ln1.b"], n)
    q = s.linear(h, p["q.w"], p["q.b"], d)
    k = s.linear(h, p["k.w"], p["k.b"], d)
    v = s.linear(h, p["v.w"], p["v.b"], d)
    if attn == "eager":
        o, probs = _attention_eager(s, q, k, v, c, heads, seq, mask, clone_qkv=c > 1, explicit_fp32=True)
    else:  # q is a transposed view of q_proj's output, so the kernel's output (empty_like(query))
        # is already [b, L, h, d] in memory and `.transpose(1, 2).contiguous()` is free
        o, probs = s.flash(q, k, v, c * heads * _lse_len(s, seq)), None
    s.drop(q, k, v)
    a = s.linear(o, p["o.w"], p["o.b"], d)
    s.drop(o, h)
    x2 = s.add(x, a)
    s.drop(a)
    h2 = s.layer_norm(x2, p["ln2.w"], p["ln2.b"], n)
    f = s.linear(h2, p["fc1.w"], p["fc1.b"], inter)
    g = s.gelu(f)
    s.drop(f)
    y = s.linear(g, p["fc2.w"], p["fc2.b"], d)
    s.drop(g, h2)
    out = s.add(x2, y)
    s.drop(x2, y, probs)  # `hidden_states, _ = self.self_attn(...)`: `_` lives to the layer's end
    return out


def _lse_len(s: _Sim, seq: int) -> int:
    """Logsumexp length per (batch, head): flash keeps L; memory-efficient (fp32) rounds to 32."""
    return seq if s.cd == HALF else -(-seq // EFFICIENT_LSE_ROUND) * EFFICIENT_LSE_ROUND


def _layer_params(s: _Sim, trained: bool, d: int, inter: int, k_bias: bool = True) -> dict[str, _T]:
    shapes = {"ln1.w": d, "ln1.b": d, "q.w": d * d, "q.b": d, "k.w": d * d, "k.b": d if k_bias else 0,
              "v.w": d * d, "v.b": d, "o.w": d * d, "o.b": d, "ln2.w": d, "ln2.b": d,
              "fc1.w": d * inter, "fc1.b": inter, "fc2.w": inter * d, "fc2.b": d}
    return {k: s.param(v, trained) for k, v in shapes.items() if v}


def vision_tower_memory(cfg: Mapping[str, Any], *, crops: int, patches: int, chunk: int = VISION_BATCH_SIZE,
                        attn: str = "eager", trained: bool, grad_ckpt: bool, module_dtype_bytes: int,
                        autocast: bool, masked: bool = False) -> EncoderMemory:
    """SigLIP vision tower (``vpm``) over ``crops`` crops of ``patches`` patches each, run in
    chunks of ``chunk`` crops whose outputs are concatenated (MiniCPM ``get_vllm_embedding``).

    Args:
        cfg: SigLIP vision config (``hidden_size``, ``intermediate_size``, ``num_hidden_layers``,
            ``num_attention_heads``, ``patch_size``, ``image_size``, ``num_channels``).
        crops: crops of the micro-batch (all images); patches: the longest crop's patch count
            (every crop is padded to it).
        chunk: crops per tower call (0: all at once).
        attn: ``eager`` (MiniCPM's default for the tower) or ``sdpa``.
        trained: the tower's parameters require grad; False also means its input needs none, so
            autograd saves nothing (``--tune_vision false``).
        grad_ckpt: non-reentrant checkpointing of each encoder layer.
        module_dtype_bytes: parameter element size (4 fp32, 2 bf16).
        autocast: CUDA autocast to bf16/fp16 over fp32 weights (HF Trainer amp).
        masked: some crops are shorter than ``patches``; MiniCPM's navit tower then adds a
            [C, 1, L, L] mask to eager scores (``_prepare_4d_attention_mask``). Eager only.

    Returns:
        Bytes per GPU for one micro-batch's vision tower.
    """
    _check(attn, module_dtype_bytes, autocast, crops=crops, patches=patches)
    if chunk < 0:
        raise ValueError(f"chunk must be >= 0; got {chunk}")
    if masked and attn != "eager":
        raise ValueError("masked crops are modelled for eager attention only")
    d, inter = _get(cfg, "hidden_size"), _get(cfg, "intermediate_size")
    layers, heads = _get(cfg, "num_hidden_layers"), _get(cfg, "num_attention_heads")
    patch, image = _get(cfg, "patch_size"), _get(cfg, "image_size")
    channels = _get(cfg, "num_channels", 3)
    s = _Sim(amp=autocast, module_item=module_dtype_bytes)
    conv_w, conv_b = s.param(d * channels * patch * patch, trained), s.param(d, trained)
    pos_w = s.param((image // patch) ** 2 * d, trained)
    blocks = [_layer_params(s, trained, d, inter) for _ in range(layers)]
    post_w, post_b = s.param(d, trained), s.param(d, trained)
    chunk = chunk or crops
    outs: list[_T] = []
    for start in range(0, crops, chunk):
        c = min(chunk, crops - start)
        n = c * patches
        pixels = _T(c * channels * patches * patch * patch, module_dtype_bytes, False)  # the caller's
        emb = s.conv(pixels, conv_w, conv_b, n * d)
        pos = s.embedding(pos_w, patches * d)
        x = s.add(emb, pos)
        s.drop(emb, pos)
        mask = _navit_mask(s, c, patches, x.item) if masked else None
        embeds = s.alias(x)  # SiglipEncoder.forward(inputs_embeds): referenced until the tower returns
        for p in blocks:
            y = s.checkpoint(lambda t, p=p, c=c, mask=mask: _siglip_layer(s, t, p, (c, patches, d, inter, heads),
                                                                           attn, mask), x, grad_ckpt, (mask,))
            s.drop(x)
            x = y
        out = s.layer_norm(x, post_w, post_b, n)
        s.drop(x, mask, embeds)
        outs.append(out)
    return _finish(s, outs, trained)


def _navit_mask(s: _Sim, c: int, seq: int, item: int) -> _T:
    """``_prepare_4d_attention_mask(mask, dtype)``: expand().to(dtype), ``1.0 - mask``, a bool
    copy for ``masked_fill`` and its result, all [C, 1, L, L]; the last one is kept."""
    numel = c * seq * seq
    expanded = s.new(numel, item)
    inverted = s.new(numel, item)
    s.drop(expanded)
    as_bool = s.new(numel, BOOL)
    mask = s.new(numel, item)
    s.drop(inverted, as_bool)
    return mask


# --------------------------------------------------------------------------------------------
# Whisper encoder (transformers WhisperEncoder)
# --------------------------------------------------------------------------------------------


def _whisper_layer(s: _Sim, x: _T, p: dict[str, _T], dims: tuple[int, ...], attn: str, mask: _T | None) -> _T:
    c, seq, d, inter, heads = dims
    n = c * seq
    h = s.layer_norm(x, p["ln1.w"], p["ln1.b"], n)
    q0 = s.linear(h, p["q.w"], p["q.b"], d)
    q1 = s.mul_scalar(q0)  # q_proj(x) * self.scaling
    s.drop(q0)
    q = s.clone(q1)  # .view().transpose(1, 2).contiguous()
    s.drop(q1)
    k0 = s.linear(h, p["k.w"], None, d)
    k = s.clone(k0)
    s.drop(k0)
    v0 = s.linear(h, p["v.w"], p["v.b"], d)
    v = s.clone(v0)
    s.drop(v0)
    if attn == "eager":
        o, probs = _attention_eager(s, q, k, v, c, heads, seq, mask, clone_qkv=False, explicit_fp32=False)
    else:
        # the kernel's output takes the layout of the contiguous [b, h, L, d] query (meta and CUDA:
        # empty_like(query)), so `attn_output.transpose(1, 2).contiguous()` copies it
        flash = s.flash(q, k, v, c * heads * _lse_len(s, seq))
        o, probs = s.clone(flash), None
        s.drop(flash)
    s.drop(q, k, v)
    a = s.linear(o, p["o.w"], p["o.b"], d)
    s.drop(o, h)
    x2 = s.add(x, a)
    s.drop(a)
    h2 = s.layer_norm(x2, p["ln2.w"], p["ln2.b"], n)
    f = s.linear(h2, p["fc1.w"], p["fc1.b"], inter)
    g = s.gelu(f)  # hidden_states = self.activation_fn(self.fc1(hidden_states))
    s.drop(f, h2)
    y = s.linear(g, p["fc2.w"], p["fc2.b"], d)
    s.drop(g)
    out = s.add(x2, y)
    s.drop(x2, y, probs)
    return out


def whisper_encoder_memory(cfg: Mapping[str, Any], *, pieces: int, positions: int, attn: str, trained: bool,
                           grad_ckpt: bool, module_dtype_bytes: int, autocast: bool,
                           minicpm_o: bool = False) -> EncoderMemory:
    """Whisper encoder (``apm``) over ``pieces`` audio pieces of ``positions`` encoder positions
    each (1500 for 30 s; the mel input has twice as many frames).

    Args:
        cfg: Whisper config (``d_model``, ``encoder_layers``, ``encoder_attention_heads``,
            ``encoder_ffn_dim``, ``num_mel_bins``).
        attn, trained, grad_ckpt, module_dtype_bytes, autocast: as ``vision_tower_memory``.
        minicpm_o: run it as MiniCPM-o 2.6's ``get_audio_hidden_states`` runs its
            ``MiniCPMWhisperEncoder``: an additive [P, 1, L, L] padding + per-second chunk mask
            in the weights' dtype (with its bool [P, 1, L, L] and [L, L] helpers alive
            alongside), the position table sliced instead of looked up, and
            ``output_hidden_states=True`` (every layer's input referenced until the encoder
            returns). Eager only (with a mask, sdpa would take the memory-efficient kernel,
            which is not modelled).

    Returns:
        Bytes per GPU for one micro-batch's audio encoder.
    """
    _check(attn, module_dtype_bytes, autocast, pieces=pieces, positions=positions)
    if minicpm_o and attn != "eager":
        raise ValueError("the MiniCPM-o audio path (an attention mask) is modelled for eager attention only")
    d, inter = _get(cfg, "d_model"), _get(cfg, "encoder_ffn_dim")
    layers, heads, mels = _get(cfg, "encoder_layers"), _get(cfg, "encoder_attention_heads"), _get(cfg, "num_mel_bins")
    s = _Sim(amp=autocast, module_item=module_dtype_bytes)
    c1w, c1b = s.param(d * mels * 3, trained), s.param(d, trained)
    c2w, c2b = s.param(d * d * 3, trained), s.param(d, trained)
    table = s.param(positions * d, False)  # WhisperEncoder.__init__: embed_positions.requires_grad_(False)
    blocks = [_layer_params(s, trained, d, inter, k_bias=False) for _ in range(layers)]
    ln_w, ln_b = s.param(d, trained), s.param(d, trained)
    n, square = pieces * positions, pieces * positions * positions
    held: list[_T] = []
    mask = None
    if minicpm_o:  # built by the caller before the encoder runs
        mask = s.new(square, module_dtype_bytes)  # padding_mask.view().expand().to(conv1.weight.dtype)
        chunk = s.new(positions * positions, BOOL)  # subsequent_chunk_mask
        not_chunk = s.new(positions * positions, BOOL)
        merged = s.new(square, BOOL)  # torch.logical_or(...), then mask[merged] = -inf in place
        s.drop(not_chunk)
        held += [mask, chunk, merged]
    feats = _T(pieces * mels * 2 * positions, module_dtype_bytes, False)  # the caller's
    c1 = s.conv(feats, c1w, c1b, pieces * d * 2 * positions)
    g1 = s.gelu(c1)
    s.drop(c1)
    c2 = s.conv(g1, c2w, c2b, n * d)
    s.drop(g1)
    g2 = s.gelu(c2)
    s.drop(c2)
    if minicpm_o:  # hidden_states = inputs_embeds + self.embed_positions.weight[:L]
        x = s.add(g2, table)
    else:
        arange = s.new(positions, INT64)  # all_positions
        pos = s.embedding(table, positions * d)
        x = s.add(g2, pos)
        s.drop(pos)
        held.append(arange)
    held.append(g2)  # `inputs_embeds` stays referenced until the encoder's forward returns
    for p in blocks:
        if minicpm_o:
            held.append(s.alias(x))  # encoder_states += (hidden_states,)
        y = s.checkpoint(lambda t, p=p: _whisper_layer(s, t, p, (pieces, positions, d, inter, heads), attn, mask),
                         x, grad_ckpt, (mask,))
        s.drop(x)
        x = y
    out = s.layer_norm(x, ln_w, ln_b, n)
    s.drop(x, *held)
    return _finish(s, [out], trained)


# --------------------------------------------------------------------------------------------
# MiniCPM resampler (resampler.py ``Resampler.forward`` with torch's multi_head_attention_forward)
# --------------------------------------------------------------------------------------------


def resampler_memory(cfg: Mapping[str, Any], *, crops: int, patches: int, trained: bool, module_dtype_bytes: int,
                     autocast: bool, input_requires_grad: bool = False) -> EncoderMemory:
    """MiniCPM's perceiver resampler over ``crops`` crops of ``patches`` patches (all the same
    size: no key padding).

    Args:
        cfg: ``num_queries``, ``embed_dim``, ``num_heads``, ``kv_dim`` (the vision width).
        trained: its parameters require grad (MiniCPM's fine-tuning script always trains it).
        module_dtype_bytes, autocast: as ``vision_tower_memory``.
        input_requires_grad: the vision tower is trained, so ``kv_proj`` also returns the gradient
            of its input.

    Returns:
        Bytes per GPU for one micro-batch's resampler call.
    """
    _check("eager", module_dtype_bytes, autocast, crops=crops, patches=patches)
    q_len, d, heads = _get(cfg, "num_queries"), _get(cfg, "embed_dim"), _get(cfg, "num_heads")
    kv_dim = cfg.get("kv_dim") or d
    s = _Sim(amp=autocast, module_item=module_dtype_bytes)
    query = s.param(q_len * d, trained)
    kv_w = s.param(d * kv_dim, trained) if kv_dim != d else None
    in_w, in_b = s.param(3 * d * d, trained), s.param(3 * d, trained)
    out_w, out_b = s.param(d * d, trained), s.param(d, trained)
    lns = {k: (s.param(d, trained), s.param(d, trained)) for k in ("q", "kv", "post")}
    proj = s.param(d * d, trained)
    md, c, n = module_dtype_bytes, crops, crops * patches
    x_in = _T(n * kv_dim, md, input_requires_grad)  # the tower's output, owned by the caller

    padding = s.new(n, BOOL)  # key_padding_mask = torch.zeros((bs, max_patch_len), dtype=bool)
    per_crop = [s.new(patches * d, md) for _ in range(c)]  # pos_embed[:h, :w].reshape(): copies
    pos = s.new(n * d, md)  # pad_sequence
    s.drop(*per_crop)
    kv = s.linear(x_in, kv_w, None, d) if kv_w is not None else s.alias(x_in)
    xk = s.layer_norm(kv, *lns["kv"], n)  # permuted [L, C, D] view of [C, L, D]
    s.drop(kv)
    q = s.layer_norm(query, *lns["q"], q_len)
    qr = s.repeat(q, c)
    key = s.add(xk, pos)
    out = _mha(s, qr, key, xk, in_w, in_b, out_w, out_b, c, q_len, patches, d, heads)
    s.drop(qr, key, xk)  # x = out.permute(1, 0, 2) releases ln_kv's output
    post = s.layer_norm(out, *lns["post"], c * q_len)
    s.drop(out)
    res = s.linear(post, proj, None, d)  # x @ self.proj
    s.drop(post, q, pos, padding)
    return _finish(s, [res], trained or input_requires_grad)


def _mha(s: _Sim, query: _T, key: _T, value: _T, in_w: _T, in_b: _T, out_w: _T, out_b: _T, c: int, q_len: int,
         seq: int, d: int, heads: int) -> _T:
    """torch 2.13 ``F.multi_head_attention_forward``, training, ``need_weights=True`` (MiniCPM's
    call), a bool ``key_padding_mask`` and query, key, value three different tensors."""
    kpm = s.new(c * seq, query.item)  # _canonical_mask: zeros_like(float).masked_fill_
    wq, wk, wv = s.split(in_w, 3)
    bq, bk, bv = s.split(in_b, 3)
    # key and value are [L, C, D] views of [C, L, D] tensors: contiguous only for one crop
    qp = s.linear(query, wq, bq, d, cacheable=False)
    kp = s.linear(key, wk, bk, d, contiguous=c == 1, cacheable=False)
    vp = s.linear(value, wv, bv, d, contiguous=c == 1, cacheable=False)
    # .view(C, 1, 1, L).expand(-1, heads, -1, -1).reshape(C * heads, 1, L): a copy unless C == 1
    mask = s.new(c * heads * seq, kpm.item) if c > 1 else s.alias(kpm)
    s.drop(kpm)
    qs = s.mul_scalar(qp)  # q * sqrt(1 / E); `q` itself stays referenced until the function returns
    # baddbmm is autocast lower precision: the cast materialises the expanded [C*h, 1, L] mask
    m = s.new(c * heads * seq, s.cd) if s.amp and mask.item != s.cd else s.alias(mask)
    scores = s.bmm(qs, kp, c * heads * q_len * seq)
    s.drop(qs, m)
    probs = s.softmax(scores, FP32 if s.amp else scores.item)
    s.drop(scores)
    pc = s.ac(probs)
    o = s.bmm(pc, vp, c * q_len * d)
    s.drop(pc)
    oc = s.clone(o)  # transpose(0, 1).reshape(tgt_len * bsz, E)
    s.drop(o)
    out = s.linear(oc, out_w, out_b, d)
    s.drop(oc)
    averaged = s.new(c * q_len * seq, probs.item)  # attn_output_weights.mean(dim=1), discarded
    s.drop(averaged, probs, qp, kp, vp, mask)
    return out
