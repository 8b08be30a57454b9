"""The traced step's accounting (for planner.judge.trace): a MemTracker that keeps a peak per phase and
per step, and the conversion of its snapshots into TraceResult's categories and module peaks."""

from __future__ import annotations

from collections.abc import Callable

from planner.judge.protocol import CATEGORIES, CATEGORY_NAMES

_PHASE = {"name": "setup"}


def _make_tracker_class():
    import torch
    from torch._guards import active_fake_mode
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType, _ModState
    from torch.distributed.tensor import DTensor
    from torch.utils._pytree import tree_map_only

    class PhaseMemTracker(MemTracker):
        """MemTracker that also keeps a peak per phase and per step, and types tensors allocated
        in the optimizer phase (clipping, ``optimizer.step``) as temporaries; the step's
        post-hook then retypes the states that persist as ``Optstate`` (stock MemTracker types
        every allocation inside the step as ``Optstate`` and clipping's as ``Activation``)."""

        def __init__(self, device_type: str, on_layer: Callable[[str, int], None] | None = None) -> None:
            super().__init__()
            self.device_type = device_type
            self.on_layer = on_layer
            self.phase_peaks: dict[str, int] = {}
            self.phase_peak_snaps: dict[str, dict] = {}
            self.step_peak = 0
            self.peak_total = -1
            self.peak_snap: dict = {}
            self.peak_phase = "forward"

        def dev_snapshot(self) -> dict:
            for dev, snap in self._curr_mem_snap.items():
                if dev.type == self.device_type:
                    return snap
            return {}

        def _update_peak_stats(self, peak_state) -> None:  # noqa: ANN001
            super()._update_peak_stats(peak_state)
            snap = self.dev_snapshot()
            total = snap.get(_TOTAL_KEY, 0)
            phase = _PHASE["name"]
            # ">=": on a tie the later step wins, whose categories are settled (in the first
            # step the optimizer states are born inside optimizer.step, typed as temporaries).
            if total >= self.phase_peaks.get(phase, -1):
                self.phase_peaks[phase] = total
                self.phase_peak_snaps[phase] = dict(snap)
            if total >= self.peak_total:
                self.peak_total = total
                self.peak_snap = dict(snap)
                self.peak_phase = phase
            self.step_peak = max(self.step_peak, total)

        def _track_module_params_and_buffers(self, module, install_grad_hooks: bool = True):  # noqa: ANN001, ANN202
            # Stock MemTracker registers a grad hook on every parameter, which raises for a
            # frozen one ("cannot register a hook on a tensor that doesn't require gradient").
            def grad_hook(grad) -> None:  # noqa: ANN001
                self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

            param_memory = 0
            for param in module.parameters():
                winfos = self._update_and_maybe_create_winfos(param, _MemRefType.PARAM)
                param_memory += sum(w.mem_consumed for w in winfos)
                if param.grad is not None:
                    self._update_and_maybe_create_winfos(param.grad, _MemRefType.GRAD)
                if install_grad_hooks and param.requires_grad and self._param_to_grad_hook_handles.get(param) is None:
                    self._param_to_grad_hook_handles[param] = (
                        param.register_hook(grad_hook),
                        param.register_post_accumulate_grad_hook(lambda p: grad_hook(p.grad)),
                    )
            buffer_memory = 0
            for buffer in module.buffers():
                winfos = self._update_and_maybe_create_winfos(buffer, _MemRefType.BUFFER)
                buffer_memory += sum(w.mem_consumed for w in winfos)
            return param_memory, buffer_memory

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            if any(t == DTensor for t in types):
                return NotImplemented
            res = func(*args, **(kwargs or {}))
            if active_fake_mode() is self._fake_mode_on_entry:
                if self._in_opt or _PHASE["name"] == "optimizer" or (self._mod_tracker.is_bw and not self._in_ac):
                    reftype = _MemRefType.TEMP
                else:
                    reftype = _MemRefType.ACT
                tree_map_only(torch.Tensor, lambda t: self._track(reftype, t), res)
                self._update_peak_stats(_ModState.PEAK_BW if self._mod_tracker.is_bw else _ModState.PEAK_FW)
            return res

        def _pre_fw_hook(self, module, inputs) -> None:  # noqa: ANN001
            super()._pre_fw_hook(module, inputs)
            if self.on_layer is not None and getattr(module, "_memplan_layer", None) is not None:
                self.on_layer("recompute" if self._mod_tracker.is_bw else "forward", module._memplan_layer)

        def _pre_bw_hook(self, module, args) -> None:  # noqa: ANN001
            super()._pre_bw_hook(module, args)
            if self.on_layer is not None and module is not None and getattr(module, "_memplan_layer", None) is not None:
                self.on_layer("backward", module._memplan_layer)

    return PhaseMemTracker


def _named(snap: dict) -> dict[str, int]:
    out = {name: 0 for name in CATEGORIES}
    for key, value in snap.items():
        name = CATEGORY_NAMES.get(getattr(key, "value", key))
        if name is not None:
            out[name] += int(value)
    return out


def _module_peaks(mt, dev_type: str) -> dict[str, int]:  # noqa: ANN001
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, _ModState

    stats = list(mt.memory_tracking.values())
    roots = [s.mod_fqn for s in stats if "." not in s.mod_fqn]
    root = roots[0] if roots else ""
    out: dict[str, int] = {}
    for s in stats:
        name = s.mod_fqn[len(root) + 1:] if s.mod_fqn.startswith(root + ".") else "(root)"
        parts = name.split(".")
        if not (name == "(root)" or len(parts) <= 2 or (len(parts) == 3 and parts[2].isdigit())):
            continue
        peak = 0
        for state in (_ModState.PEAK_FW, _ModState.PEAK_BW):
            for snap in s.snapshots.get(state, []):
                for dev, dev_snap in snap.items():
                    if dev.type == dev_type:
                        peak = max(peak, dev_snap.get(_TOTAL_KEY, 0))
        out[name] = peak
    return out
