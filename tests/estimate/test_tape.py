"""The step tape's own rules (planner.estimate.tape, .ledger, .ops) on graphs small enough to follow by hand.

Every tensor below has 1000 fp32 elements unless said otherwise: 4000 bytes, one 4096-byte
storage (eight 512-byte granules), written K. Comments derive each expected figure.
"""

from __future__ import annotations

import pytest

from planner.estimate.ledger import ALLOC_GRANULE_BYTES, FP32, HALF, Ledger, Tensor, block_bytes
from planner.estimate.tape import GradSum, Recompute, Tape

K = 4096  # block_bytes(1000 * 4)
N = 1000


def _tape(recompute: Recompute = Recompute.AT_UNPACK, grad_sum: GradSum = GradSum.AFTER_ALL_USES) -> Tape:
    return Tape(autocast=False, weight_item=FP32, recompute=recompute, grad_sum=grad_sum)


def _cats(act: int = 0, tmp: int = 0, grads: int = 0) -> dict[str, int]:
    return {"activations": act, "temporaries": tmp, "gradients": grads}


def test_allocations_round_up_to_the_granule() -> None:
    assert ALLOC_GRANULE_BYTES == 512
    assert [block_bytes(n) for n in (0, 1, 512, 513, 4000)] == [0, 512, 512, 1024, K]
    led = Ledger()
    led.alloc(1, "activations")  # 1 B -> one 512 B block
    led.alloc(513, "activations")  # 513 B -> two blocks, 1024 B
    assert led.alloc(0, "activations") is None  # an empty tensor owns no block
    assert led.peak("forward") == _cats(act=512 + 1024)
    tape = _tape()
    t = tape.new(3, HALF)  # 6 B -> 512 B
    assert t.st is not None and tape.ledger.now["activations"] == 512


def test_saved_tensor_lives_until_its_node_runs() -> None:
    tape = _tape()
    w = tape.param(N, trainable=True)
    x = tape.new(N, FP32)  # an input: K
    y = tape.mul(x, w)  # K; MulBackward saves x (w's gradient needs it)
    tape.drop(x, y)  # the Python names go; the node still holds x
    assert tape.ledger.now == _cats(act=K)  # x, saved for backward
    tape.ledger.phase = "backward"
    tape.backward(y, tape.new(N, FP32))  # dL/dy: K temporary
    # The mul node allocates w's gradient (K) while x and dL/dy are still alive:
    # x (K activation) + dL/dy (K) + dL/dw (K) = 3K, then x and dL/dy are released.
    assert tape.ledger.peak("backward") == _cats(act=K, tmp=2 * K)
    assert tape.ledger.now == _cats(grads=K)  # only w.grad is left
    assert w.param is not None and w.param.grad is not None


def test_gradient_of_a_tensor_used_twice_is_summed_out_of_place() -> None:
    tape = _tape()
    x = tape.new(N, FP32)
    tape.make_leaf(x)  # requires grad, gets its own .grad
    h = tape.clone(x)  # a non-leaf used twice
    a, b = tape.clone(h), tape.clone(h)
    out = tape.add(a, b)
    tape.drop(h, a, b, out)
    assert tape.ledger.now == _cats(act=K)  # x only: clone and add save nothing
    tape.ledger.phase = "backward"
    tape.backward(out, tape.new(N, FP32))  # g: K
    # add hands g to a and b (views); b's clone passes it on to h, then a's clone passes it
    # again: InputBuffer::add makes g + g a new K tensor while g is still alive.
    # Peak: x (K) + g (K) + the sum (K) = 3K; the sum then becomes x's .grad.
    assert tape.ledger.peak("backward") == _cats(act=K, tmp=2 * K)
    assert tape.ledger.now == _cats(act=K)  # the leaf's .grad died with the graph


@pytest.mark.parametrize(
    ("rule", "peak", "final"),
    [
        # First use's gradient waits (a temporary) for the second; the two are summed out of
        # place: x (K) + two gradients + the sum (3K) = 4K, then the sum becomes .grad.
        (GradSum.AFTER_ALL_USES, _cats(act=K, tmp=3 * K), _cats(act=K, grads=K)),
        # First use's gradient is .grad at once; the second (K) adds into it in place:
        # x (K) + dL/dy (K) + .grad (K) + the second (K) = 4K.
        (GradSum.FIRST_IN_PLACE, _cats(act=K, tmp=2 * K, grads=K), _cats(act=K, grads=K)),
    ],
)
def test_parameter_used_twice(rule: GradSum, peak: dict[str, int], final: dict[str, int]) -> None:
    tape = _tape(grad_sum=rule)
    w = tape.param(N, trainable=True)
    x = tape.new(N, FP32)
    y1, y2 = tape.mul(x, w), tape.mul(x, w)  # both save x
    out = tape.add(y1, y2)
    tape.drop(y1, y2, out)
    tape.ledger.phase = "backward"
    tape.backward(out, tape.new(N, FP32))  # dL/dy: K, shared by both muls
    assert w.param is not None and w.param.uses == 2
    assert tape.ledger.peak("backward") == peak
    assert tape.ledger.now == final  # x is still the test's


def _checkpointed(tape: Tape, ckpt: bool = True, frozen: bool = False) -> tuple[Tensor, Tensor]:
    """x = x0 * w1 (outside), then a region: a = silu(x) (saves x); b = a @ w2 with 3000
    outputs (saves a; 12000 B = 3K); c = clone(b) (3K). Returns (c, x0)."""
    w1, w2 = tape.param(N, not frozen), tape.param(N, not frozen)
    x0 = tape.new(N, FP32)
    x = tape.mul(x0, w1)

    def layer(h: Tensor) -> Tensor:
        a = tape.unary_saving_input(h)
        b = tape.matmul(a, w2, 3 * N)
        tape.drop(a)
        tape.early_stop()  # where Recompute.AT_REGION stops; AT_UNPACK stops by itself
        c = tape.clone(b)
        tape.drop(b)
        return c

    c = tape.checkpoint(layer, x, enabled=ckpt)
    tape.drop(x)
    return c, x0


@pytest.mark.parametrize(
    ("rule", "peak"),
    [
        # Backward starts from x0 (saved by the mul) + x (held by the checkpoint) = 2K and
        # dL/dc (3K). AT_UNPACK replays at the matmul's node (the clone saves nothing): silu's
        # output a' (K) is allocated, then the matmul packs a' (the last of two saved tensors)
        # and the replay stops before b' and c' exist. The matmul's backward adds dL/da and
        # dL/dw2 (K each): x0 + x + a' + dL/dc + 2K = 3K + 3K + 2K = 8K.
        (Recompute.AT_UNPACK, _cats(act=3 * K, tmp=5 * K)),
        # AT_REGION replays on reaching the region and stops only at early_stop(): b' (3K) is
        # allocated too, on top of x0 + x + a' + dL/dc: 3K + 3K + 3K = 9K.
        (Recompute.AT_REGION, _cats(act=6 * K, tmp=3 * K)),
    ],
)
def test_checkpoint_recompute_stops_early_and_releases(rule: Recompute, peak: dict[str, int]) -> None:
    tape = _tape(recompute=rule)
    c, x0 = _checkpointed(tape)
    tape.drop(c, x0)
    # Forward peak at the clone: x0 + x + b (3K) + c (3K) = 8K (a has gone: the region's nodes
    # keep placeholders). Afterwards the region holds x: x0 + x = 2K.
    assert tape.ledger.peak("forward") == _cats(act=8 * K)
    assert tape.ledger.now == _cats(act=2 * K)
    tape.ledger.phase = "backward"
    tape.backward(c, tape.new(3 * N, FP32))
    assert tape.ledger.peak("backward") == peak
    # The replayed a' went with the matmul's node, x with the region, x0 with the mul:
    # only the two weight gradients are left.
    assert tape.ledger.now == _cats(grads=2 * K)


def test_checkpoint_region_that_saved_nothing() -> None:
    """Frozen weights and an input that needs no grad: no node is recorded in the region."""
    unpack = _tape(recompute=Recompute.AT_UNPACK)
    c, x0 = _checkpointed(unpack, frozen=True)
    unpack.drop(c, x0)
    assert unpack.ledger.now == _cats()  # nothing holds x: torch never replays such a region
    region = _tape(recompute=Recompute.AT_REGION)
    c, x0 = _checkpointed(region, frozen=True)
    region.drop(c, x0)
    assert region.ledger.now == _cats(act=K)  # the region holds x until backward reaches it
    region.ledger.phase = "backward"
    region.backward(c, region.new(3 * N, FP32))
    # ... and replays it there: x (K) + dL/dc (3K) + a' (K) + b' (3K) = 8K.
    assert region.ledger.peak("backward") == _cats(act=5 * K, tmp=3 * K)
    assert region.ledger.now == _cats(tmp=3 * K)  # x released; dL/dc, which no node consumes, stays
