"""Hardware: the cluster a plan runs on (nodes x GPUs of one profile) and each node's host RAM.

Part of the profile stage. Parses ``--gpus`` (``2x3090``, ``8xa100-80g``, ``2x8xh100``), detects
local GPUs with NVML (``nvidia-ml-py``) for ``--gpus auto``, and reads host RAM from
``/proc/meminfo``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from planner.errors import ProfileError
from planner.profile.catalog import Catalog, GpuSpec
from planner.units import KIB, MAX_SIZE_BYTES

_COUNT_RE = re.compile(r"^(\d+)\s*[x*]\s*(.+)$")

MAX_GPUS_PER_NODE = 64
"""GPUs (ranks) on one node. The most one server board holds is 16 (DGX-2, HGX-2); 64 leaves room
for rigs of PCIe switches. A larger count is a typo for nodes x GPUs (``2x8xh100``)."""
MAX_WORLD_SIZE = 16_384
"""GPUs in one run, all nodes: the largest training run published, Llama 3 405B's pre-training on
16,384 H100 (Dubey et al., 2024). Fine-tuning runs are far smaller, and the ZeRO-1/2 layout is
computed rank by rank: this also bounds the time of an estimate."""
MAX_NODES = MAX_WORLD_SIZE // 8
"""Nodes in one run: that same run's 2,048 nodes of 8 GPUs."""


@dataclass(frozen=True)
class Cluster:
    """Identical nodes of identical GPUs.

    Attributes:
        gpu: the GPU profile.
        nodes: number of nodes.
        gpus_per_node: GPUs (ranks) per node.
        gpu_memory_bytes: usable total per GPU, bytes (the driver's figure when detected).
        host_ram_bytes: RAM per node, bytes.
        note: how the GPUs or RAM were found, when not given by the user.
    """

    gpu: GpuSpec
    nodes: int
    gpus_per_node: int
    gpu_memory_bytes: int
    host_ram_bytes: int
    note: str | None = None

    def __post_init__(self) -> None:
        """Refuse a cluster no plan can be made for: every capacity later divides a figure.

        Raises:
            ProfileError: counts out of `MAX_NODES` / `MAX_GPUS_PER_NODE`, or a memory size that
                is not a positive whole number of bytes of at most 1 EiB.
        """
        for what, value, limit in (("nodes", self.nodes, MAX_NODES),
                                   ("GPUs per node", self.gpus_per_node, MAX_GPUS_PER_NODE)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
                raise ProfileError(f"--gpus: {value!r} {what}: memplan plans for 1 to {limit:,} {what} "
                                   "(write NODESxGPUSxNAME, e.g. 2x8xh100)")
        if self.world_size > MAX_WORLD_SIZE:
            raise ProfileError(f"--gpus {self.label}: {self.world_size:,} GPUs in all; memplan plans for at most "
                               f"{MAX_WORLD_SIZE:,}, the largest training run published (Llama 3 405B)")
        for what, value in (("--host-ram", self.host_ram_bytes), (f"memory of {self.gpu.name}", self.gpu_memory_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_SIZE_BYTES:
                raise ProfileError(f"{what} is {value!r} bytes: must be a positive size of at most 1 EiB, "
                                   "e.g. --host-ram 64GiB")

    @property
    def world_size(self) -> int:
        """Data-parallel ranks in all."""
        return self.nodes * self.gpus_per_node

    @property
    def label(self) -> str:
        """``2x8xh100-sxm`` style name."""
        lead = f"{self.nodes}x" if self.nodes > 1 else ""
        return f"{lead}{self.gpus_per_node}x{self.gpu.name}"


def parse_gpus(spec: str, catalog: Catalog) -> tuple[int, int, GpuSpec]:
    """Parse ``[NODES x] [GPUS x] NAME`` into (nodes, gpus per node, GPU profile).

    ``3090`` is one GPU; ``2x3090`` two on one node; ``2x8xh100`` two nodes of eight.

    Raises:
        ProfileError: malformed spec, zero counts or an unknown GPU name.
    """
    counts, rest = [], spec.strip().lower()
    while len(counts) < 2 and (m := _COUNT_RE.match(rest)):
        digits = m.group(1).lstrip("0") or "0"
        if len(digits) > 9:  # int() of 5,000 digits raises; Cluster checks the rest
            raise ProfileError(f"--gpus {spec[:60]!r}: a count over a billion; memplan plans for up to "
                               f"{MAX_WORLD_SIZE:,} GPUs (NODESxGPUSxNAME)")
        counts.append(int(digits))
        rest = m.group(2).strip()
    if (
        not rest
        or _COUNT_RE.match(rest)
        or re.fullmatch(r"\d+\s*[x*]", rest)
        or not re.fullmatch(r"[a-z0-9][a-z0-9._ -]*", rest)
    ):
        raise ProfileError(f"--gpus {spec!r} is malformed; expected e.g. 2x3090, 8xa100-80g, 2x8xh100 or auto")
    nodes, per_node = (counts[0], counts[1]) if len(counts) == 2 else (1, counts[0] if counts else 1)
    if nodes < 1 or per_node < 1:
        raise ProfileError(f"--gpus {spec!r}: node and GPU counts must be at least 1")
    return nodes, per_node, catalog.gpu(rest)


def detect_gpus(catalog: Catalog) -> tuple[int, GpuSpec, int]:
    """Local GPUs via NVML: (count, profile, smallest total memory in bytes).

    Raises:
        ProfileError: no NVIDIA driver, no GPU, mixed models, or a GPU with no profile.
    """
    try:
        import pynvml
    except ImportError:
        raise ProfileError("--gpus auto needs nvidia-ml-py (pip install nvidia-ml-py)") from None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise ProfileError(f"--gpus auto: no NVIDIA driver found ({exc}); name the GPUs, e.g. --gpus 2x3090") from None
    try:
        count = pynvml.nvmlDeviceGetCount()
        if count == 0:
            raise ProfileError("--gpus auto: the NVIDIA driver sees no GPU; name the GPUs, e.g. --gpus 2x3090")
        names, mems = set(), []
        for i in range(count):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            names.add(name.decode() if isinstance(name, bytes) else name)
            mems.append(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
    finally:
        pynvml.nvmlShutdown()
    if len(names) > 1:
        raise ProfileError(f"--gpus auto: mixed GPU models ({', '.join(sorted(names))}); name the ones to plan for")
    (name,) = names
    return count, catalog.gpu(name.replace(" ", "-")), min(mems)


def host_ram_bytes(meminfo: Path = Path("/proc/meminfo")) -> int:
    """This machine's total RAM (``MemTotal``), bytes.

    Raises:
        ProfileError: the file is missing or has no MemTotal line (not Linux): pass --host-ram.
    """
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * KIB
    except (OSError, ValueError, IndexError):
        pass
    raise ProfileError(f"cannot read host RAM from {meminfo}; pass --host-ram, e.g. --host-ram 128GiB")


def make_cluster(gpus: str, catalog: Catalog, host_ram: int | None = None) -> Cluster:
    """Build the cluster from a ``--gpus`` spec (or ``auto``) and an optional host RAM size."""
    notes = []
    if gpus.strip().lower() == "auto":
        count, gpu, memory = detect_gpus(catalog)
        nodes, per_node = 1, count
        notes.append(f"detected {count}x {gpu.full_name}")
    else:
        nodes, per_node, gpu = parse_gpus(gpus, catalog)
        memory = gpu.memory_bytes
    if host_ram is None:
        host_ram = host_ram_bytes()
        notes.append("host RAM read from this machine's /proc/meminfo (--host-ram to plan for another)")
    return Cluster(gpu, nodes, per_node, memory, host_ram, "; ".join(notes) or None)
