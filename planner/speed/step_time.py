"""Speed: seconds per optimizer step of one setup, term by term, to rank the setups that fit.

Estimate stage, beside the memory estimate: pure arithmetic (no torch, no I/O). The terms add up
with no overlap assumed (DeepSpeed overlaps some transfers with compute, so a real step can be
shorter); every constant below is named with its unit and source. docs/speed.md derives each
formula and records the checks against real components.

* ``compute``: forward + backward FLOPs of the rank's samples (``planner.speed.flops``: 2 FLOPs per
  weight per position, attention 4 s A, input gradients only where a trained tensor lies
  upstream, weight gradients only for trained weights) over the GPU's dense peak for the
  precision times ``MODEL_FLOPS_UTILIZATION``.
* ``recompute``: the extra forward of checkpointed layers under ``grad_ckpt``, same rate.
* ``zero_comm``: bytes each rank sends over the ring's slowest link (ring all-reduce
  ``2(n-1)/n B``, all-gather and reduce-scatter ``(n-1)/n B``; Rajbhandari et al. 2020 sec. 7)
  for what DeepSpeed 0.19.8 / DDP run per optimizer step (``planner.speed.traffic.collectives``).
* ``offload``: host <-> GPU copies over PCIe and NVMe reads/writes that the offloads add
  (``planner.speed.traffic.host_traffic``).
* ``cpu_optimizer``: DeepSpeedCPUAdam over the rank's partition on its share of the host's
  cores and memory bandwidth (measured by ``benchmarks/cpu_adam.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from planner.estimate.states import ZeroSettings
from planner.profile.catalog import GpuSpec, ModelSpec
from planner.profile.hardware import Cluster
from planner.speed.flops import sample_flops
from planner.speed.traffic import collectives, host_traffic
from planner.units import ceil_div
from planner.workload.inventory import Param, Workload
from planner.workload.options import Engine, Offload, Precision, TrainingOptions, ZeroStage

TERMS = ("compute", "recompute", "zero_comm", "offload", "cpu_optimizer")

MODEL_FLOPS_UTILIZATION = 0.40
"""Achieved / peak dense FLOP/s of the model's own FLOPs (MFU). PaLM (Chowdhery et al. 2022,
Table 3) reports 46.2 % for PaLM 540B and 21-32 % for GPT-3, Gopher and MT-NLG; Megatron-LM
(Narayanan et al. 2021) reaches about 50 % on A100s with every optimization on. HF Trainer at a
micro-batch of one 1-4k-token sequence on a few GPUs sits lower; 0.40 is an assumption, not a
measurement (no GPU was available to calibrate it), applied to compute alone: communication and
offload are separate terms."""

PCIE_GBPS_PER_LANE = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938}
"""GB/s per lane and direction after line coding (8b/10b for gen 1-2, 128b/130b for gen 3-5):
PCI-SIG base specifications; x16 gives 15.75 / 31.5 / 63.0 GB/s for gen 3 / 4 / 5."""
PCIE_EFFICIENCY = 0.80
"""Achieved / line rate of large pinned copies (``cudaMemcpy`` H2D/D2H): NVIDIA's bandwidthTest
sample typically shows 12-13 GB/s on gen3 x16 and 24-26 GB/s on gen4 x16."""
PAGEABLE_FACTOR = 0.5
"""Pageable host memory: the CUDA driver stages every copy through a pinned bounce buffer, about
half the pinned rate (NVIDIA, "How to Optimize Data Transfers in CUDA C/C++")."""
NO_P2P_FACTOR = 0.5
"""GeForce cards have no PCIe peer-to-peer on stock drivers: NCCL then moves GPU-to-GPU traffic
through host memory (the SHM transport: the sender copies to host memory, the receiver from it),
so a peer link is taken to carry half the PCIe rate. An assumption, not measured here."""
NVLINK_EFFICIENCY = 0.80
"""NCCL bus bandwidth (as nccl-tests doc/PERFORMANCE.md defines it) / NVLink rate per direction:
``all_reduce_perf`` on a DGX A100 is commonly reported at about 230 GB/s of the 300 GB/s per
direction."""
INTER_NODE_GBIT_PER_S = 100.0
"""Node-to-node link, Gbit/s: one 100 GbE / RoCE NIC per node, common for small clusters
(InfiniBand HDR is 200); a ring across nodes crosses it once per node."""
NETWORK_EFFICIENCY = 0.80
"""Achieved / line rate of NCCL over that NIC (same order as the NVLink figure; assumption)."""
NVME_READ_BYTES_PER_S = 5.0e9
NVME_WRITE_BYTES_PER_S = 3.5e9
"""One PCIe 4.0 x4 NVMe SSD per node, about 70 % of its spec-sheet sequential 7.0 / 5.0 GB/s
(e.g. Samsung 980 PRO) through DeepSpeed's async I/O; all ranks of a node share it (assumption)."""
CPU_ADAM_ELEMENTS_PER_S_PER_CORE = 0.9e9
"""DeepSpeedCPUAdam (AdamW, fp32 states) elements per second on one core: measured with
``benchmarks/cpu_adam.py`` on this machine (Xeon with AVX-512, 2 vCPUs): one thread 0.92-1.04 e9
on 10 M and 50 M elements, two threads 1.77 e9 on 50 M (0.89 e9 each) when the machine was
otherwise idle (docs/speed.md). The same rate in and out of cache: compute-bound. AVX2-only
desktop CPUs have half the vector width."""
ADAM_STEP_BYTES_PER_ELEMENT = 28
"""Memory traffic of one fp32 Adam update per element: read parameter, gradient and both states,
write parameter and both states (7 x 4 bytes)."""
CAST_BYTES_PER_ELEMENT = 6
"""Casting the updated fp32 master to the 16-bit module copy: read 4, write 2 bytes."""
CPU_ADAM_BYTES_PER_ELEMENT = ADAM_STEP_BYTES_PER_ELEMENT + CAST_BYTES_PER_ELEMENT
"""Host memory traffic per element of an offloaded step (DeepSpeedCPUAdam, then the cast of the
new fp32 partition to 16 bit for the GPU)."""
HOST_MEMORY_BYTES_PER_S = 40e9
"""Achieved host memory bandwidth that a node's CPU optimizers share: about 75 % of dual-channel
DDR4-3200 (51.2 GB/s), a desktop board with two GPUs (STREAM-like rates; an assumption). One
core of the measuring machine already streams 26-29 GB/s of Adam traffic, so on such a desktop
CPU Adam is bound by memory, not by cores; servers have 4-12 channels."""
DEFAULT_HOST_CORES = 8
"""Cores per node that run the CPU optimizer, all ranks together: a desktop 8-core CPU (Ryzen 7
/ Core i7) as in a two-GPU rig. Launched with ``torchrun`` and no ``OMP_NUM_THREADS``, every rank
runs CPU Adam on one thread (torch/distributed/run.py sets ``OMP_NUM_THREADS=1`` for more than
one process per node); pass ``host_cores=gpus_per_node`` to model that. With
``HOST_MEMORY_BYTES_PER_S`` the memory, not the cores, limits CPU Adam on such a desktop, so the
count matters only below one core per rank or on servers."""
GPU_MEMORY_EFFICIENCY = 0.80
"""Achieved / peak memory bandwidth of a streaming kernel such as the GPU optimizer step
(``gpu_optimizer_bytes``; BabelStream-class triad rates)."""
@dataclass(frozen=True)
class StepTime:
    """Seconds per optimizer step, by term, and the work it does.

    Attributes:
        terms: seconds per optimizer step for each of ``TERMS``, for the slowest rank.
        flops_per_step: model FLOPs per optimizer step, whole cluster, without recomputation.
        tokens_per_step: LLM tokens per optimizer step, whole cluster.
        notes: one line per term saying what it counts (for ``describe``).
    """

    terms: dict[str, float]
    flops_per_step: float
    tokens_per_step: int
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def total_s(self) -> float:
        """Seconds per optimizer step."""
        return sum(self.terms.values())

    @property
    def tokens_per_s(self) -> float:
        """LLM tokens per second, whole cluster."""
        total = self.total_s
        return self.tokens_per_step / total if total and math.isfinite(total) else 0.0


def peak_flops(gpu: GpuSpec, precision: Precision) -> float:
    """Dense peak FLOP/s for the step's matmuls: bf16/fp16 tensor cores, or plain fp32 (torch
    does not use TF32 for matmuls by default). 0 when the GPU has no bf16."""
    tflops = {Precision.FP32: gpu.fp32_tflops, Precision.AMP_FP16: gpu.fp16_tflops}.get(precision, gpu.bf16_tflops)
    return tflops * 1e12


def pcie_bytes_per_s(gpu: GpuSpec) -> float:
    """Line rate of the GPU's host link, bytes/s per direction."""
    per_lane = PCIE_GBPS_PER_LANE.get(gpu.pcie_gen, PCIE_GBPS_PER_LANE[max(PCIE_GBPS_PER_LANE)])
    return per_lane * gpu.pcie_lanes * 1e9


def peer_link(cluster: Cluster, nvlink: bool | None = None) -> tuple[float, str]:
    """Achieved bandwidth (bytes/s per direction) of the slowest link in the ring, and its name.

    NVLink counts when the GPU has it and it is in use: always on SXM boards; on PCIe cards only
    with a bridge (``nvlink=True``; bridges join pairs, so only with two GPUs per node).
    """
    gpu = cluster.gpu
    wanted = gpu.form_factor == "sxm" if nvlink is None else nvlink
    bridged = gpu.form_factor == "sxm" or cluster.gpus_per_node == 2
    if gpu.nvlink_gbps > 0 and wanted and bridged:
        bw, name = gpu.nvlink_gbps / 2 * 1e9 * NVLINK_EFFICIENCY, "NVLink"
    else:
        bw = pcie_bytes_per_s(gpu) * PCIE_EFFICIENCY
        name = f"PCIe gen{gpu.pcie_gen} x{gpu.pcie_lanes}"
        if not gpu.pcie_p2p:
            bw *= NO_P2P_FACTOR
            name += " through host memory (no P2P)"
    if cluster.nodes > 1:
        net = INTER_NODE_GBIT_PER_S * 1e9 / 8 * NETWORK_EFFICIENCY
        if net < bw:
            bw, name = net, f"{INTER_NODE_GBIT_PER_S:g} Gbit/s between nodes"
    return bw, name


def gpu_optimizer_bytes(options: TrainingOptions) -> int:
    """GPU memory traffic per element of an optimizer step on the GPU: the fp32 Adam update, plus
    the cast to the 16-bit module copy under DeepSpeed mixed precision; pure bf16 streams bf16
    states and weights (half the bytes, no cast). Memory-bound, so the optimizer's flavour
    (fused, foreach, 8-bit) is not distinguished."""
    if options.precision is Precision.PURE_BF16:
        return ADAM_STEP_BYTES_PER_ELEMENT // 2
    cast = options.engine is Engine.DEEPSPEED and options.precision is not Precision.FP32
    return ADAM_STEP_BYTES_PER_ELEMENT + (CAST_BYTES_PER_ELEMENT if cast else 0)


def optimizer_elements(params: Sequence[Param], options: TrainingOptions, world_size: int) -> int:
    """Elements the rank's optimizer updates: its partition under ZeRO 1-3, all trained ones else."""
    trained = sum(p.numel for p in params if p.trainable)
    partitioned = options.engine is Engine.DEEPSPEED and options.zero is not ZeroStage.DISABLED
    return ceil_div(trained, max(world_size, 1)) if partitioned else trained


def step_time(model: ModelSpec, params: Sequence[Param], cluster: Cluster, options: TrainingOptions,
              workload: Workload, zero: ZeroSettings, *, nvlink: bool | None = None,
              host_cores: int = DEFAULT_HOST_CORES) -> StepTime:
    """Seconds per optimizer step of one setup, by term (module docstring, docs/speed.md).

    Args:
        model, params: the model and its run inventory (``trainable_inventory``).
        cluster: GPUs and nodes; every rank processes ``micro_batch x grad_accum`` samples.
        options, workload, zero: the setup, what a micro-step processes, DeepSpeed's values.
        nvlink: whether GPUs talk over NVLink; None: on SXM boards yes, on PCIe cards no (a
            bridge is rare).
        host_cores: cores per node running the CPU optimizer, all ranks together.

    Returns:
        The terms in seconds for one rank (all ranks do the same work), and the whole cluster's
        FLOPs and tokens per step. A GPU without the precision's units (bf16 on a V100) gets an
        infinite compute time.
    """
    n = cluster.world_size
    samples = workload.micro_batch * workload.grad_accum
    flops = sample_flops(model, params, workload, options.grad_ckpt)
    peak = peak_flops(cluster.gpu, options.precision) * MODEL_FLOPS_UTILIZATION
    opt_elems = optimizer_elements(params, options, n)
    gpu_opt = 0.0
    if options.offload_optimizer is Offload.NONE:
        gpu_opt = opt_elems * gpu_optimizer_bytes(options) / (cluster.gpu.memory_bandwidth_gbps * 1e9
                                                              * GPU_MEMORY_EFFICIENCY)
    work = samples * (flops.forward + flops.backward)
    compute = work / peak + gpu_opt if peak else math.inf
    recompute = samples * flops.recompute / peak if peak else (math.inf if flops.recompute else 0.0)

    link, link_name = peer_link(cluster, nvlink)
    colls = collectives(model, params, options, workload, zero, n)
    sent = sum(c.sent_bytes(n) for c in colls)
    comm = sent / link

    traffic = host_traffic(model, params, options, workload, zero, n)
    pcie = pcie_bytes_per_s(cluster.gpu) * PCIE_EFFICIENCY * (1.0 if options.pin_memory else PAGEABLE_FACTOR)
    per_node = cluster.gpus_per_node
    offload = ((traffic.to_gpu + traffic.to_host) / pcie + per_node * traffic.nvme_read / NVME_READ_BYTES_PER_S
               + per_node * traffic.nvme_write / NVME_WRITE_BYTES_PER_S)

    cpu = 0.0
    if options.offload_optimizer is not Offload.NONE:
        rate = min(CPU_ADAM_ELEMENTS_PER_S_PER_CORE * host_cores / per_node,
                   HOST_MEMORY_BYTES_PER_S / per_node / CPU_ADAM_BYTES_PER_ELEMENT)
        cpu = opt_elems / rate

    terms = {"compute": compute, "recompute": recompute, "zero_comm": comm, "offload": offload,
             "cpu_optimizer": cpu}
    gb = 1e9
    notes = {
        "compute": (f"{work / 1e12:.1f} TFLOP forward+backward per rank ({samples} sample"
                    f"{'s' if samples > 1 else ''}) at "
                    f"{MODEL_FLOPS_UTILIZATION:.0%} of {peak_flops(cluster.gpu, options.precision) / 1e12:g} "
                    f"TFLOP/s {options.precision.value}"
                    + (f", plus the GPU optimizer over {opt_elems / 1e9:.2f} G elements" if gpu_opt else "")),
        "recompute": (f"{samples * flops.recompute / 1e12:.1f} TFLOP of recomputed layer forwards"
                      if options.grad_ckpt else "no gradient checkpointing"),
        "zero_comm": (f"{sent / gb:.2f} GB sent per rank over {link_name} at {link / gb:.1f} GB/s: "
                      + "; ".join(f"{c.op} {c.what} {c.nbytes / gb:.2f} GB" for c in colls)
                      if colls else "one GPU: no collectives"),
        "offload": (f"{traffic.to_gpu / gb:.2f} GB up, {traffic.to_host / gb:.2f} GB down at {pcie / gb:.1f} GB/s"
                    + (f"; NVMe {traffic.nvme_read / gb:.2f} GB read, {traffic.nvme_write / gb:.2f} GB written"
                       " per rank" if traffic.nvme_read or traffic.nvme_write else "")
                    if offload else "nothing offloaded"),
        "cpu_optimizer": (f"DeepSpeedCPUAdam over {opt_elems / 1e9:.2f} G elements on {host_cores / per_node:g}"
                          f" cores per rank" if cpu else "optimizer on the GPU"),
    }
    tokens = workload.micro_batch * workload.grad_accum * n * workload.seq_len
    return StepTime(terms, samples * n * (flops.forward + flops.backward), tokens, notes)


def describe(step: StepTime) -> list[tuple[str, float, str]]:
    """Each term as (name, seconds, what it counts), in ``TERMS`` order."""
    return [(name, step.terms[name], step.notes.get(name, "")) for name in TERMS]
