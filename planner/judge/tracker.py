"""The traced step's accounting (for planner.judge.trace): a MemTracker that keeps a peak per phase and
per step, and the conversion of its snapshots into TraceResult's categories and module peaks."""

from __future__ import annotations

from collections.abc import Callable

from planner.judge.protocol import CATEGORIES, CATEGORY_NAMES

_PHASE = {"name": "setup"}


def _make_tracker_class():
    from copy import deepcopy

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
            self.layer_stack: list[int] = []
            self.layers_seen: set[int] = set()
            self.moment_peaks: dict[str, dict[str, dict]] = {}

        def dev_snapshot(self) -> dict:
            for dev, snap in self._curr_mem_snap.items():
                if dev.type == self.device_type:
                    return snap
            return {}

        def _update_peak_stats(self, peak_state) -> None:  # noqa: ANN001
            self._update_module_peaks(peak_state)
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
            moment = self.moment()
            moments = self.moment_peaks.setdefault(phase, {})
            if total >= moments.get(moment, {}).get(_TOTAL_KEY, -1):
                moments[moment] = dict(snap)

        def _update_module_peaks(self, peak_state) -> None:  # noqa: ANN001
            """Stock ``MemTracker._update_peak_stats``, with the same updates: each running module's
            local peak and snapshot, then the device peak. Stock code walks the stats of every module
            of the model on every op to find the running ones (``ModTracker.parents``), which made
            that walk nine tenths of a large model's trace (a 7B vision-language model's ~1,000
            modules times its per-window attention ops); here the running ones are looked up by name."""
            if len(self.memory_tracking) != getattr(self, "_indexed", -1):
                self._by_fqn: dict[str, list] = {}
                for stats in self.memory_tracking.values():
                    self._by_fqn.setdefault(stats.mod_fqn, []).append(stats)
                self._indexed = len(self.memory_tracking)
            curr_snap = self._curr_mem_snap
            for fqn in self._mod_tracker.parents:
                for stats in self._by_fqn.get(fqn, ()):
                    if peak_state not in stats.snapshots:
                        continue
                    for dev, dev_snap in curr_snap.items():
                        if stats.local_peak.get(dev, 0) < dev_snap[_TOTAL_KEY]:
                            stats.local_peak[dev] = dev_snap[_TOTAL_KEY]
                            stats.snapshots[peak_state][-1][dev] = deepcopy(dev_snap)
            for dev, dev_snap in curr_snap.items():
                if self._peak_mem.get(dev, 0) < dev_snap[_TOTAL_KEY]:
                    self._peak_mem[dev] = dev_snap[_TOTAL_KEY]
                    self._peak_mem_snap[dev] = deepcopy(dev_snap)

        def moment(self) -> str:
            """Where in the phase the step is: inside decoder layer ``i`` (``"3"``), before any
            layer ran in this phase (``"pre"``: embeddings in forward, the loss and head in
            backward) or after the last (``"post"``)."""
            if self.layer_stack:
                return str(self.layer_stack[-1])
            return "post" if self.layers_seen else "pre"

        def start_phase(self) -> None:
            """A new phase: no layer seen yet (moments of the last step's phases are kept)."""
            self.layer_stack.clear()
            self.layers_seen.clear()
            self.moment_peaks.pop(_PHASE["name"], None)

        def _enter_layer(self, module) -> None:  # noqa: ANN001
            idx = getattr(module, "_memplan_layer", None)
            if idx is not None:
                self.layer_stack.append(idx)
                self.layers_seen.add(idx)

        def _leave_layer(self, module) -> None:  # noqa: ANN001
            idx = getattr(module, "_memplan_layer", None)
            if idx is not None and self.layer_stack and self.layer_stack[-1] == idx:
                self.layer_stack.pop()

        def _post_fw_hook(self, module, inputs, outputs) -> None:  # noqa: ANN001
            super()._post_fw_hook(module, inputs, outputs)
            self._leave_layer(module)

        def _post_bw_hook(self, module, args) -> None:  # noqa: ANN001
            super()._post_bw_hook(module, args)
            if module is not None:
                self._leave_layer(module)

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
            self._enter_layer(module)
            if self.on_layer is not None and getattr(module, "_memplan_layer", None) is not None:
                self.on_layer("recompute" if self._mod_tracker.is_bw else "forward", module._memplan_layer)

        def _pre_bw_hook(self, module, args) -> None:  # noqa: ANN001
            super()._pre_bw_hook(module, args)
            if module is not None:
                self._enter_layer(module)
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
