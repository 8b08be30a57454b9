"""The decoder's modules on the step tape: ``nn.Linear`` (with a peft LoRA adapter), RMSNorm, RoPE,
self-attention and its kernels (eager, sdpa's flash / memory-efficient / math, FlashAttention-2), the
gated MLP and the pre-norm decoder layer.

Estimate stage; pure arithmetic (no torch, no I/O). ``DecoderModules`` is the part of
``planner.estimate.decoder``'s step replay that writes one ``*DecoderLayer.forward`` out op by op
(transformers 5.24 ``models/<type>/modeling_<type>.py``); the step (embeddings, layers, norm,
lm_head, loss, backward) is in ``planner.estimate.decoder``. Docs: docs/activations.md.
"""

from __future__ import annotations

from planner.estimate.ledger import FP32, HALF, Tensor
from planner.estimate.ops import EFFICIENT_LSE_ROUND, flash_backward_workspace
from planner.estimate.tape import Tape


class DecoderModules:
    """The modules of one decoder layer, as methods of the step replay (``decoder._Decoder``, its
    subclass): they read its dims ``d``, tape ``sim``, ``params``, ``lora`` and shapes."""

    # ---- building blocks -------------------------------------------------------------------
    def linear(self, x: Tensor, stem: str, out_f: int) -> Tensor:
        """``nn.Linear`` (+ a peft LoRA adapter): under autocast the input is cast at every call,
        the weight through the cache; mm saves the input only for a trainable weight and the weight
        only when the input requires grad."""
        sim = self.sim
        w = self.params[stem + ".weight"]
        bias = self.params.get(stem + ".bias")
        # Casts left to right (input, weight, bias), unlike Tape.linear: the order of their
        # ToCopy nodes decides which of two equal backward peaks is recorded (docs/activations.md).
        xc = sim.ac(x)
        wc = sim.cast_weight(w)
        bc = sim.cast_weight(bias)
        out = sim.matmul(xc, wc, self.N * out_f, bc)
        sim.drop(xc, wc, bc)
        if stem in self.lora:
            out = self._lora(x, stem, out, out_f)
        return out

    def _lora(self, x: Tensor, stem: str, base: Tensor, out_f: int) -> Tensor:
        """A peft LoRA adapter on ``stem`` (``tuners/lora/layer.py`` ``Linear.forward``):
        ``x = self._cast_input_dtype(x, lora_A.weight.dtype)`` (under amp a bf16 input, o_proj's or
        down_proj's, goes to fp32, and autocast casts it back to bf16 for lora_A), then
        ``result + lora_B(lora_A(dropout(x))) * scaling``. ``dropout`` is an ``nn.Identity`` for
        ``lora_dropout`` 0 and an ``nn.Dropout`` above: a scaled copy of x that lora_A saves
        instead of x, and a bool mask the dropout saves (``TapeOps.dropout``). The base matmul
        ran on the undropped x before, so what it saves does not change. Returns the sum."""
        sim = self.sim
        r = self.lora[stem]
        a = self.params[stem + ".lora_A.weight"]
        bb = self.params[stem + ".lora_B.weight"]
        x_l = sim.cast(x, a.item)
        dropped = sim.dropout(x_l) if self.lora_dropout > 0 else sim.alias(x_l)
        xa = sim.ac(dropped)
        ac = sim.cast_weight(a)
        mid = sim.matmul(xa, ac, self.N * r)
        sim.drop(xa, ac, dropped)  # lora_A's argument dies when lora_A returns
        bc = sim.cast_weight(bb)
        low = sim.matmul(mid, bc, self.N * out_f)
        sim.drop(mid, bc)
        scaled = sim.mul(low, None)  # * scaling
        sim.drop(low)
        res = sim.add(base, scaled)
        sim.drop(base, scaled, x_l)  # x_l stays bound (peft rebinds x) until forward returns
        return res

    def rmsnorm(self, x: Tensor, name: str, rows: int) -> Tensor:
        """Llama-style RMSNorm (Qwen2/Qwen3/Llama/Mistral/Phi-3 ``*RMSNorm.forward``):
        ``x32 = x.to(fp32); x32 * rsqrt(x32.pow(2).mean(-1) + eps)``, cast back to the input dtype,
        then ``weight * that`` (the weight's dtype wins the promotion). Gemma's variant multiplies
        by ``1 + weight`` in fp32 before casting back (``GemmaRMSNorm``)."""
        sim = self.sim
        w = self.params[name]
        x32 = sim.cast(x, FP32)
        sq = sim.new(x.numel, FP32, rg=x32.rg)  # pow(2): saves its input
        sim.node([sq], [x32], [x32], lambda s, g, x32=x32: _pow_bw(s, x32))
        mean = sim.new(rows, FP32, rg=sq.rg)  # variance = pow(2).mean(-1): bound until return
        sim.node([mean], [sq], [], lambda s, g, sq=sq: [s.grad(sq)])
        sim.drop(sq)
        var = sim.new(rows, FP32, rg=mean.rg)  # + eps
        sim.node([var], [mean], [], lambda s, g: [s.alias(g[0])])
        r = sim.new(rows, FP32, rg=var.rg)  # rsqrt: saves its result
        sim.node([r], [var], [r], lambda s, g, var=var: _rsqrt_bw(s, var))
        sim.drop(var)
        y = sim.mul(x32, r)  # rebinds hidden_states: the fp32 copy is only kept if saved
        sim.drop(r, x32)
        if self.d.model_type == "gemma":
            wf = sim.cast(w, FP32)
            one_plus = sim.new(w.numel, FP32, rg=w.rg)  # 1.0 + weight.float()
            sim.node([one_plus], [wf], [], lambda s, g: [s.alias(g[0])])
            sim.drop(wf)
            out32 = sim.mul(y, one_plus)
            sim.drop(y, one_plus)
            out = sim.cast(out32, x.item)  # .type_as(x)
            sim.drop(out32, mean)
            return out
        yd = sim.cast(y, x.item)
        out = sim.mul(w, yd)
        sim.drop(yd, y, mean)  # y and variance stay bound until the function returns
        return out

    def rope(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """``apply_rotary_pos_emb``: ``x * cos + rotate_half(x) * sin`` with
        ``rotate_half = cat(-x2, x1)``. cos/sin have the embedding's dtype, so under amp the
        product of a bf16 projection and fp32 cos is fp32. Phi-3 slices the rotary part and
        concatenates the rest back (an extra copy)."""
        sim = self.sim
        phi3 = self.d.model_type == "phi3"
        if phi3:  # q_rot, q_pass = q[..., :rotary_dim], q[..., rotary_dim:] (rotary_dim = hd)
            base = x
            x = sim.slice(base, base.numel)
            x_pass = Tensor(base.numel, base.item, base.rg, None)  # empty slice: a zero-byte gradient
            sim.node([x_pass], [base], [], lambda s, g, b=base: [Tensor(b.numel, b.item, False, None)])
        half = x.numel // 2
        t1 = sim.mul(x, cos, x.numel)
        x1, x2 = sim.slice(x, half), sim.slice(x, half)  # rotate_half: x[..., :d/2], x[..., d/2:]
        neg = sim.new(half, x.item, rg=x.rg)  # -x2
        sim.node([neg], [x2], [], lambda s, g, x2=x2: [s.grad(x2)])
        rot = sim.new(x.numel, x.item, rg=x.rg)  # cat((-x2, x1)): CatBackward hands out views

        def cat_bw(s: Tape, g: list[Tensor | None], neg=neg, x1=x1) -> list[Tensor | None]:
            return [s.view(g[0], neg.numel), s.view(g[0], x1.numel)]

        sim.node([rot], [neg, x1], [], cat_bw)
        sim.drop(neg, x1, x2)
        t2 = sim.mul(rot, sin, x.numel)
        sim.drop(rot)
        out = sim.add(t1, t2)
        sim.drop(t1, t2)
        if phi3:  # cat([rotated, x_pass]): a copy; CatBackward hands out views
            full = sim.new(out.numel, out.item, rg=out.rg)
            sim.node([full], [out, x_pass], [], lambda s, g, o=out: [s.alias(g[0]), s.view(g[0], 0)])
            sim.drop(out, x)
            out = full
        return out

    def heads(self, proj: Tensor) -> Tensor:
        """``proj.view(b, s, heads, hd).transpose(1, 2)``: a view; its backward reshapes the
        transposed gradient, which copies (``ViewBackward`` of a non-contiguous gradient)."""
        sim = self.sim
        out = Tensor(proj.numel, proj.item, proj.rg, sim.alias(proj).st)
        sim.node([out], [proj], [], lambda s, g, p=proj: [s.grad(p)])
        return out

    def attention_core(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The attention kernel; returns the [b, s, nh*hd] input of o_proj and the attention
        weights the module returns (eager only)."""
        d, sim = self.d, self.sim
        gqa = d.kv_heads != d.heads
        if self.attn == "eager":
            return self._eager(q, k, v, mask)
        if self.attn == "sdpa" and mask is not None and gqa:
            k, v = self._repeat_kv(k), self._repeat_kv(v)  # use_gqa_in_sdpa is False with a mask
            gqa = False
        else:
            k, v = sim.alias(k), sim.alias(v)
        # CUDA autocast lists sdpa as lower precision; transformers' FA2 path casts fp32 inputs too.
        qc, kc, vc = sim.ac(q), sim.ac(k), sim.ac(v)
        sim.drop(k, v)
        if self.attn == "flash_attention_2" or (qc.item == HALF and mask is None and d.head_dim <= 256):
            out = self._flash(qc, kc, vc)
            if d.model_type == "phi3":
                # The flash output copies the query's layout (mha_fwd: empty_like(q)); Phi-3's
                # query comes out of a cat, laid out [b, nh, s, hd], so transpose(1, 2).contiguous()
                # copies it for o_proj. Other models' queries keep q_proj's [b, s, nh, hd] layout.
                copy = sim.clone(out)
                sim.drop(out)
                out = copy
        elif not gqa:
            out = self._efficient(qc, kc, vc, mask)
        else:
            out = self._math(qc, kc, vc, mask)
        sim.drop(qc, kc, vc)
        return out, None

    def _flash(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Flash attention (sdpa's ``_scaled_dot_product_flash_attention`` or FA2): saves q, k, v,
        the output and an fp32 logsumexp [b, nh, s]; its output is laid out [b, s, nh, hd], so
        o_proj reads it without a copy. Backward: dq, dk, dv, plus the kernel's fp32 dq
        accumulator and softmax_d and, under GQA, full-head dk/dv before the reduction (real GPU
        allocations a meta kernel cannot show; counted when ``workspaces``)."""
        d = self.d
        ws = flash_backward_workspace(self.b, self.s, d.heads, d.kv_heads, d.head_dim, q.item)
        return self.sim.attention(q, k, v, self.b * d.heads * self.s, workspace=ws if self.workspaces else ())

    def _efficient(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """Memory-efficient attention (``_scaled_dot_product_efficient_attention``; fp32 without
        GQA, or with a mask): saves q, k, v, the output, a [b, nh, ceil(s/32)*32] fp32 logsumexp,
        the philox seed/offset and the bias (the mask, converted to the query dtype, padded to a
        multiple of 16 and expanded: ``preprocess_mask`` in torch's sdpa; in the traced router too)."""
        d, sim = self.d, self.sim
        bias = None
        if mask is not None:
            padded = -(-self.s // 16) * 16
            bias = sim.new(self.b * self.s * padded, q.item)  # where(mask, 0, -inf) then pad
        lse_len = -(-self.s // EFFICIENT_LSE_ROUND) * EFFICIENT_LSE_ROUND
        out = sim.attention(q, k, v, self.b * d.heads * lse_len, bias=bias)
        sim.drop(bias)
        return out

    def _repeat_kv(self, x: Tensor) -> Tensor:
        """``repeat_kv``: expand + reshape copies the kv heads up to nh heads; backward sums them."""
        return self.sim.repeat(x, x.numel * (self.d.heads // self.d.kv_heads))

    def _math(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """sdpa's math fallback (``_scaled_dot_product_attention_math``; fp32 with GQA): q and k
        scaled by sqrt(scale), k/v repeated to nh heads (``repeat_interleave``), an fp32 causal
        mask [s, s] built from ``ones.tril``, scores, ``scores + mask``, ``_safe_softmax`` (saved),
        ``probs @ v``; the [b, nh, s, hd] result is copied into [b, s, nh*hd] for o_proj."""
        d, sim = self.d, self.sim
        S = self.b * d.heads * self.s * self.s
        qs = sim.mul(q, None)
        tri = sim.new(self.s * self.s, 1) if mask is None else None  # ones(L, S).tril()
        fmask = sim.new(self.s * self.s, q.item) if mask is None else sim.alias(mask)
        sim.drop(tri)
        kr = self._repeat_kv(k) if d.kv_heads != d.heads else sim.alias(k)
        vr = self._repeat_kv(v) if d.kv_heads != d.heads else sim.alias(v)
        ks = sim.mul(kr, None)
        scores = sim.matmul(qs, ks, S)
        sim.drop(ks)  # the scaled key is a temporary; the scaled query stays bound (q_) until return
        masked = sim.add(scores, Tensor(fmask.numel, fmask.item, False, None))
        sim.drop(scores)
        probs = sim.softmax(masked, masked.item)
        sim.drop(masked)
        o = sim.matmul(probs, vr, self.N * self.q_dim)
        sim.drop(probs, vr, kr, fmask, qs)
        out = sim.clone(o)  # transpose(1, 2).contiguous()
        sim.drop(o)
        return out

    def _eager(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """``eager_attention_forward``: repeat_kv, ``q @ k^T`` (autocast casts both), ``* scaling``,
        ``+ mask`` (an fp32 mask promotes bf16 scores to fp32), ``softmax(dtype=fp32)`` (saved;
        a 16-bit input is converted first), ``.to(query.dtype)`` (a no-op under amp, where the
        query is fp32 after RoPE), ``probs @ v`` (autocast casts the probabilities; saved) and a
        contiguous copy of the output. Returns the output and ``attn_weights``, which the decoder
        layer keeps bound (``hidden_states, _ = self.self_attn(...)``) until it returns."""
        d, sim = self.d, self.sim
        S = self.b * d.heads * self.s * self.s
        kr = self._repeat_kv(k) if d.kv_heads != d.heads else sim.alias(k)
        vr = self._repeat_kv(v) if d.kv_heads != d.heads else sim.alias(v)
        kc, qc = sim.ac(kr), sim.ac(q)
        raw = sim.matmul(qc, kc, S)
        sim.drop(kc, qc)
        scores = sim.mul(raw, None)
        sim.drop(raw)
        if mask is not None:
            masked = sim.add(scores, Tensor(mask.numel, mask.item, False, None))
            sim.drop(scores)
            scores = masked
        probs = sim.softmax(scores, FP32)
        weights = sim.cast(probs, q.item)
        sim.drop(probs, scores)  # attn_weights rebinds: the masked scores go
        pc, vc = sim.ac(weights), sim.ac(vr)
        o = sim.matmul(pc, vc, self.N * self.q_dim)
        sim.drop(pc, vc, vr, kr)
        out = sim.clone(o)  # attn_output.transpose(1, 2).contiguous()
        sim.drop(o)
        return out, weights

    def attention(self, x: Tensor, i: int, cos: Tensor, sin: Tensor,
                  mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``*Attention.forward``: projections, (Qwen3) q/k norms, RoPE, the KV cache's copies,
        the kernel and o_proj."""
        d, sim = self.d, self.sim
        p = f"model.layers.{i}.self_attn"
        if d.model_type == "phi3":
            qkv = self.linear(x, f"{p}.qkv_proj", self.q_dim + 2 * self.kv_dim)
            parts = [sim.slice(qkv, self.N * n) for n in (self.q_dim, self.kv_dim, self.kv_dim)]
            sim.drop(qkv)
            q, k, v = (self.heads(t) for t in parts)
            sim.drop(*parts)
        else:
            q0 = self.linear(x, f"{p}.q_proj", self.q_dim)
            k0 = self.linear(x, f"{p}.k_proj", self.kv_dim)
            v0 = self.linear(x, f"{p}.v_proj", self.kv_dim)
            if d.model_type == "qwen3":  # q_norm / k_norm over head_dim, before the transpose
                qn = self.rmsnorm(q0, f"{p}.q_norm.weight", self.N * d.heads)
                kn = self.rmsnorm(k0, f"{p}.k_norm.weight", self.N * d.kv_heads)
                sim.drop(q0, k0)
                q0, k0 = qn, kn
            q, k, v = self.heads(q0), self.heads(k0), self.heads(v0)
            sim.drop(q0, k0, v0)
        qe = self.rope(q, cos, sin)
        sim.drop(q)
        ke = self.rope(k, cos, sin)
        sim.drop(k)
        if self.use_cache:  # DynamicLayer.update: cat([empty, new]) copies keys and values
            kk, vv = sim.clone(ke), sim.clone(v)
            sim.drop(ke, v)
            ke, v = kk, vv
            self.cache_keep += [sim.alias(ke), sim.alias(v)]
        o_in, weights = self.attention_core(qe, ke, v, mask)
        sim.drop(qe, ke, v)
        out = self.linear(o_in, f"{p}.o_proj", d.hidden)
        sim.drop(o_in)
        return out, weights

    def mlp(self, x: Tensor, i: int) -> Tensor:
        """Gated MLP: ``down(act(gate(x)) * up(x))``; Phi-3 computes gate and up in one matmul and
        ``chunk``s it (SplitBackward concatenates the two gradients into one full-size tensor)."""
        d, sim = self.d, self.sim
        p = f"model.layers.{i}.mlp"
        if d.model_type == "phi3":
            gu = self.linear(x, f"{p}.gate_up_proj", 2 * d.intermediate)
            gate, up = sim.split(gu, 2)
            sim.drop(gu)
            act = sim.unary_saving_input(gate)
            prod = sim.mul(up, act)
            sim.drop(gate, up, act)
        else:
            gate = self.linear(x, f"{p}.gate_proj", d.intermediate)
            act = sim.unary_saving_input(gate)
            sim.drop(gate)
            up = self.linear(x, f"{p}.up_proj", d.intermediate)
            prod = sim.mul(act, up)
            sim.drop(act, up)
        out = self.linear(prod, f"{p}.down_proj", d.hidden)
        sim.drop(prod)
        return out

    def layer(self, x: Tensor, i: int, cos: Tensor, sin: Tensor, mask: Tensor | None) -> Tensor:
        """``*DecoderLayer.forward`` (pre-norm residual blocks). A checkpoint recomputation stops
        once the last saved tensor is packed (torch.utils.checkpoint ``_checkpoint_early_stop``;
        ``Recompute.AT_UNPACK``), so neither the final residual add nor, with LoRA on down_proj,
        the adapter's output is allocated again."""
        sim = self.sim
        p = f"model.layers.{i}"
        h = self.rmsnorm(x, f"{p}.input_layernorm.weight", self.N)
        a, weights = self.attention(h, i, cos, sin, mask)
        sim.drop(h)
        mid = sim.add(x, a)
        sim.drop(a)
        h2 = self.rmsnorm(mid, f"{p}.post_attention_layernorm.weight", self.N)
        m = self.mlp(h2, i)
        sim.drop(h2)
        out = sim.add(mid, m)
        sim.drop(mid, m, weights)
        return out


def _pow_bw(s: Tape, x: Tensor) -> list[Tensor | None]:
    """``pow_backward``: ``grad * 2 * x.pow(1)``: two full-size intermediates and the result."""
    a, b = s.new(x.numel, x.item), s.new(x.numel, x.item)
    out = s.new(x.numel, x.item)
    s.drop(a, b)
    return [out]


def _rsqrt_bw(s: Tape, v: Tensor) -> list[Tensor | None]:
    """``rsqrt`` backward: ``-0.5 * result.pow(3) * grad``."""
    a, b = s.new(v.numel, v.item), s.new(v.numel, v.item)
    out = s.new(v.numel, v.item)
    s.drop(a, b)
    return [out]
