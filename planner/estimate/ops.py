"""The common ops on the step tape: autocast's casts and weight cache, matmul and linear, elementwise ops,
softmax, views and copies, norms, convolution, and the fused attention kernels with their workspaces.

Estimate stage; pure arithmetic (no torch, no I/O). Each op allocates its outputs on the ledger
and records an autograd node with the tensors the real op saves (torch
``tools/autograd/derivatives.yaml``); its backward allocates the input gradients. ``TapeOps`` is
the part of ``planner.estimate.tape.Tape`` that holds them; the tape itself keeps the ledger, the
graph, checkpoint regions and the backward engine.
"""

from __future__ import annotations

from collections.abc import Sequence

from planner.estimate.ledger import BOOL, FP32, INT64, Tensor

# --------------------------------------------------------------------------------------------
# Constants (each with where it comes from)
# --------------------------------------------------------------------------------------------

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
# The ops
# --------------------------------------------------------------------------------------------


class TapeOps:
    """The ops of ``Tape`` (its base class): each uses the tape's ``new``, ``node``, ``alias`` and
    ``drop`` and, for autocast, its ``autocast``, ``compute_item`` and weight ``cache``."""

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

        def bw(s: TapeOps, g: list[Tensor | None], a=a, b=b, bias=bias) -> list[Tensor | None]:
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

        def bw(s: TapeOps, g: list[Tensor | None], a=a, b=b, numel=numel, item=item) -> list[Tensor | None]:
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

        def bw(s: TapeOps, g: list[Tensor | None], a=a, b=b) -> list[Tensor | None]:
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

    def dropout(self, x: Tensor) -> Tensor:
        """``nn.Dropout`` in training with 0 < p < 1 on a CUDA tensor: ``native_dropout``
        (aten/src/ATen/native/Dropout.cpp ``is_fused_kernel_acceptable``) returns the scaled copy
        (x's dtype; no autocast list names it) and a bool mask of x's shape, and saves only the
        mask (derivatives.yaml ``native_dropout``: ``result1``); backward,
        ``native_dropout_backward(grad, mask, scale)``, allocates one gradient of x's shape."""
        out = self.new(x.numel, x.item, x.rg)
        mask = self.new(x.numel, BOOL)
        self.node([out], [x], [mask], lambda s, g, x=x: [s.grad(x)])
        self.drop(mask)
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

        def bw(s: TapeOps, g: list[Tensor | None], q=q, k=k, v=v) -> list[Tensor | None]:
            scratch = [s.new(numel, item) for numel, item in workspace]
            grads = [s.grad(q), s.grad(k), s.grad(v)]
            s.drop(*scratch)
            return grads

        self.node([out], [q, k, v], [q, k, v, out, lse, bias, *rng], bw)
        self.drop(lse, *rng)
        return out
