"""Devices and processes: where a run computes and how its processes share the work.

torchrun DDP (one process per GPU, on one host or many), torch-xla (one process per TPU device, or SPMD:
one process per host driving all its devices over a global ('data',) mesh), the batch prefetcher
(`BatchStream`: replay samples -> device tensors, sampled ahead by a thread) and batched device -> host
copies for checkpoints (`to_cpu`).

Machinery: what a real run needs and the paper does not describe. A reader of the paper may skip it.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from machinery.flags import ConfigError


def _xla_available() -> bool:
    try:
        import torch_xla  # noqa: F401
    except ImportError:
        return False
    return True


def select_device(name: str = "auto") -> torch.device:
    """auto: XLA when torch_xla imports, else CUDA, else MPS, else CPU. Any other name is used as given."""
    if name == "auto":
        if _xla_available():
            name = "xla"
        elif torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "xla":
        if not _xla_available():
            raise ConfigError(
                "--device xla needs torch_xla; install requirements-tpu.txt or pick another device."
            )
        import torch_xla

        return torch_xla.device()
    if name == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per process
        name = f"cuda:{os.environ['LOCAL_RANK']}"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"unknown --device {name!r}; use auto, cpu, cuda, cuda:N, mps or xla.") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} asked for CUDA but torch sees no GPU; use --device cpu.")
    use_cuda_device(device)
    return device


def use_cuda_device(device: torch.device) -> None:
    """Make `device` (cuda:N) this thread's current CUDA device; a no-op for other devices. Without it every
    torchrun rank of a multi-GPU node would create a context on GPU 0 and its pinned memory and synchronize
    calls would act there. The current device is per thread: BatchStream's sampler thread calls it too."""
    if device.type != "cuda" or device.index is None:
        return
    if device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"--device {device} (LOCAL_RANK or cuda:N) names GPU {device.index}, but torch sees "
            f"{torch.cuda.device_count()}; start at most that many processes per node (torchrun "
            "--nproc_per_node) or check CUDA_VISIBLE_DEVICES."
        )
    torch.cuda.set_device(device)


@dataclass
class Processes:
    """This process among its peers: the first one (rank 0) logs, evaluates and saves."""

    rank: int = 0
    world_size: int = 1
    xla: bool = False  # gradients are averaged by xm.optimizer_step instead of DDP
    spmd: bool = False  # XLA SPMD: rank/world_size count hosts; the compiler averages the gradients
    mesh: Any = None  # SPMD: the ('data',) mesh over all devices of all hosts

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        # SPMD: no barrier needed (every host runs every step and evaluation; each SPMD graph waits for
        # all hosts), and torch-xla's rendezvous is a collective outside the mesh
        if self.world_size > 1 and not self.spmd:
            if self.xla:
                import torch_xla.core.xla_model as xm

                xm.rendezvous("barrier")
            else:
                dist.barrier()

    def close(self) -> None:
        """Leave torchrun's process group (XLA's runtime needs nothing)."""
        if self.world_size > 1 and not self.xla:
            dist.destroy_process_group()


def setup_distributed(device: torch.device) -> Processes:
    """torchrun sets RANK/WORLD_SIZE: join its group (nccl on CUDA, gloo on CPU). XLA: torch_xla's runtime."""
    if device.type == "xla":
        import torch_xla.runtime as xr

        if xr.is_spmd():
            return setup_spmd()
        return Processes(rank=xr.global_ordinal(), world_size=xr.world_size(), xla=True)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Processes()
    backend = "nccl" if device.type == "cuda" else "gloo"
    # a long timeout, because the other ranks wait while rank 0 evaluates 40 games.
    dist.init_process_group(backend, timeout=timedelta(hours=3))
    return Processes(rank=dist.get_rank(), world_size=world_size)


def xla_metrics_line(step: int, rank: int = 0) -> str:
    """Compile/execute counts of torch_xla's metrics; after warm-up only the execute count should grow.
    Executions count single-device graphs (ExecuteTime) and SPMD graphs run on all devices
    (ExecuteReplicatedTime)."""
    import torch_xla.debug.metrics as met

    def count(name: str) -> int:
        data = met.metric_data(name)  # (count, total ns, samples) or None
        return int(data[0]) if data else 0

    compile_s = (met.metric_data("CompileTime") or (0, 0))[1] / 1e9
    fallbacks = {n: met.counter_value(n) for n in met.counter_names() if n.startswith("aten::")}
    return (
        f"[xla rank {rank}] step {step}: compiles {count('CompileTime')} ({compile_s:.1f} s), "
        f"executions {count('ExecuteTime') + count('ExecuteReplicatedTime')}, "
        f"device->host transfers {count('TransferFromDeviceTime')}, "
        f"cpu fallbacks {fallbacks or 'none'}"
    )


def sync_device(device: torch.device) -> None:
    """Cut the lazy XLA graph here (one step = one graph); a no-op elsewhere."""
    if device.type == "xla":
        import torch_xla

        torch_xla.sync()


def init_xla_runtime(device: str, xla_spmd: bool, xla_cache_dir: str, xla_multiprocess: bool = False) -> None:
    """Before the first XLA tensor: the persistent compilation cache (--xla-cache-dir) and SPMD mode
    (--xla-spmd). Both must precede any computation; without either flag this does nothing."""
    if not (xla_spmd or xla_cache_dir):
        return
    if device not in ("auto", "xla") or not _xla_available():
        raise ConfigError(
            "--xla-spmd and --xla-cache-dir need torch_xla and --device xla (or auto); install "
            "requirements-tpu.txt or drop the flag."
        )
    if xla_spmd and xla_multiprocess:
        raise ConfigError(
            "--xla-spmd and --xla-multiprocess are two ways of data parallelism on XLA; pass one "
            "(--xla-spmd is torch-xla's recommended one)."
        )
    import torch_xla.runtime as xr

    if xla_cache_dir:
        # per host; a pod's other hosts could share one read-only (initialize_cache(readonly=True))
        xr.initialize_cache(xla_cache_dir, readonly=False)
    if xla_spmd:
        xr.use_spmd()


def _xla_worker(index: int, main: Any, args: Any) -> None:
    """torch_xla.launch calls this in every process, with the process index first."""
    main(args)


def launch(main: Any, args: Any, xla_multiprocess: bool = False) -> Any:
    """main(args); with --xla-multiprocess, one main(args) per TPU device through torch_xla's launcher."""
    if not xla_multiprocess:
        return main(args)
    import torch_xla

    torch_xla.launch(_xla_worker, args=(main, args))


def setup_spmd() -> Processes:
    """XLA SPMD: one process per host, one ('data',) mesh over the devices of all hosts. Ranks are hosts
    (xr.process_index of xr.process_count): each samples its share of the global batch from its share
    of the data; the compiler splits every step over the mesh and inserts the gradient all-reduce."""
    import torch_xla.distributed.spmd as xs
    import torch_xla.runtime as xr

    n = xr.global_runtime_device_count()
    mesh = xs.Mesh(np.arange(n), (n,), ("data",))
    return Processes(rank=xr.process_index(), world_size=xr.process_count(), xla=True, spmd=True, mesh=mesh)


def shard_batch(tensors: dict[str, torch.Tensor], device: torch.device, mesh: Any) -> dict[str, torch.Tensor]:
    """SPMD: this host's rows of the global batch (CPU tensors) onto the devices, every tensor split along
    dim 0 over the 'data' axis. minibatch=True: each host hands over only its own rows (its
    B / process_count), and together they form the global batch; one transfer per tensor rank."""
    import torch_xla.core.xla_model as xm
    import torch_xla.distributed.spmd as xs

    out: dict[str, torch.Tensor] = {}
    for ndim in sorted({v.dim() for v in tensors.values()}):
        group = {k: v for k, v in tensors.items() if v.dim() == ndim}
        spec = xs.ShardingSpec(mesh, ("data",) + (None,) * (ndim - 1), minibatch=True)
        out.update(xm.send_cpu_data_to_device(group, device, spec))
    return {k: out[k] for k in tensors}


def spmd_any(flag: bool, mesh: Any) -> bool:
    """SPMD: whether `flag` is True on any host. Each host hands over one value per device it drives (its
    rows of a [devices] tensor sharded over 'data', as its share of a batch); the devices take the max (the
    partitioner inserts the all-reduce across hosts) and every host reads the same answer. It is one SPMD
    graph like a training step, so every host must call it at the same step; no other channel between
    hosts is needed (no address, no shared file)."""
    import torch_xla.runtime as xr

    local = torch.full((xr.addressable_runtime_device_count(),), int(flag), dtype=torch.int32)
    return bool(mesh_max(local, mesh))


def mesh_max(local: torch.Tensor, mesh: Any) -> int:
    """The max over all hosts' rows: `local` [this host's devices] int32 -> one int, the same on every
    host."""
    import torch_xla

    sharded = shard_batch({"flag": local}, torch_xla.device(), mesh)["flag"]  # [all devices], sharded
    return int(sharded.max().cpu())


def check_spmd_args(batch_size: int, record_missing: int, processes: Processes) -> None:
    """SPMD: the global batch must split evenly over all devices (and then over hosts)."""
    if not processes.spmd:
        return
    import torch_xla.runtime as xr

    n = xr.global_runtime_device_count()
    if batch_size % n:
        raise ConfigError(
            f"--batch-size {batch_size} does not split over the {n} XLA devices of the SPMD mesh; "
            f"use a multiple of {n}."
        )
    if record_missing > 0 and processes.world_size > 1:
        raise ConfigError(
            "--record-missing records on one host only; record the data first (python record.py) or "
            "run it on a single host."
        )


def broadcast_initial_weights(net: torch.nn.Module, processes: Processes) -> None:
    """XLA with one process per device: start every replica from the first one's weights. On TPU v2/v3
    (and CPU_NUM_DEVICES) replicas are threads of one process sharing one CPU RNG, so the same seed does
    not give the same init. Elsewhere a no-op (DDP broadcasts at wrapping; SPMD has one copy)."""
    if processes.xla and not processes.spmd and processes.world_size > 1:
        import torch_xla.core.xla_model as xm

        xm.broadcast_master_param(net)


def data_parallel(net: torch.nn.Module, processes: Processes, device: torch.device) -> torch.nn.Module:
    """`net` wrapped in DDP under torchrun (backward averages the gradients); `net` itself otherwise."""
    if processes.world_size > 1 and not processes.xla:
        return torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None
        )
    return net


def _xla_spmd() -> bool:
    import torch_xla.runtime as xr

    return xr.is_spmd()


class BatchStream:
    """Hands out (batch, replay_state_after_it). With prefetch > 0 a thread samples ahead.

    The replay state travels with each batch so that a checkpoint stores the state right after the
    last batch the learner used, not after the ones the thread sampled ahead: `--resume` then gives
    the same next batches.
    """

    def __init__(
        self,
        data: Any,  # replay.MultiGameReplay: sample(batch_size) and state_dict()
        batch_size: int,
        device: torch.device,
        prefetch: int,
        mesh: Any = None,
    ):
        self.data, self.batch_size, self.device = data, batch_size, device
        self.mesh = mesh  # XLA SPMD: batches are split over this mesh (shard_batch)
        self.games_seen: list[np.ndarray] | None = None  # debug (--save-all-ranks): each batch's games
        self.pin = device.type == "cuda"
        self.wait_time = 0.0
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        if prefetch > 0:
            self._queue = queue.Queue(maxsize=prefetch)
            self._thread = threading.Thread(target=self._produce, daemon=True)
            self._thread.start()

    def _sample(self) -> tuple[dict[str, torch.Tensor], dict]:
        b = self.data.sample(self.batch_size)
        tensors = {name: torch.from_numpy(np.asarray(value)) for name, value in b._asdict().items()}
        if self.pin:
            tensors = {k: v.pin_memory() for k, v in tensors.items()}
        return tensors, self.data.state_dict()

    def _produce(self) -> None:
        try:
            use_cuda_device(self.device)  # pin_memory below works for this rank's GPU, not GPU 0
            while not self._stop.is_set():
                item = self._sample()
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # hand the error to the learner
            self._queue.put(e)

    def next(self) -> tuple[dict[str, torch.Tensor], dict]:
        start = time.perf_counter()
        if self._queue is None:
            item = self._sample()
        else:
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
        tensors, state = item
        if self.games_seen is not None:
            self.games_seen.append(tensors["game"].numpy().copy())
        if self.mesh is not None:
            tensors = shard_batch(tensors, self.device, self.mesh)
        else:
            tensors = {k: v.to(self.device, non_blocking=self.pin) for k, v in tensors.items()}
        self.wait_time += time.perf_counter() - start
        return tensors, state

    def close(self) -> None:
        self._stop.set()
        if self._queue is not None:
            self._thread.join(timeout=5)


def to_cpu(obj: Any) -> Any:
    """A copy of nested dicts/lists/tuples with every tensor moved to the CPU in one batched transfer:
    on XLA one call for all tensors (as xm.save does), on CUDA non-blocking copies and one synchronize,
    instead of one blocking .cpu() per tensor."""
    tensors: list[torch.Tensor] = []

    def collect(o: Any) -> Any:  # the structure with every tensor replaced by its index in `tensors`
        if torch.is_tensor(o):
            tensors.append(o)
            return _TensorSlot(len(tensors) - 1)
        if isinstance(o, dict):
            return {k: collect(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return type(o)(collect(v) for v in o)
        return o

    def rebuild(o: Any, cpu: list[torch.Tensor]) -> Any:
        if isinstance(o, _TensorSlot):
            return cpu[o.index]
        if isinstance(o, dict):
            return {k: rebuild(v, cpu) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return type(o)(rebuild(v, cpu) for v in o)
        return o

    skeleton = collect(obj)
    return rebuild(skeleton, tensors_to_cpu(tensors))


@dataclass(frozen=True)
class _TensorSlot:
    index: int


def tensors_to_cpu(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Device tensors -> CPU tensors, batched per device type; CPU tensors are returned as they are."""
    out = list(tensors)
    xla = [i for i, t in enumerate(tensors) if t.device.type == "xla"]
    if xla:
        import torch_xla

        moved = [tensors[i] for i in xla]
        # what xm.save does (through xm._maybe_convert_to_cpu): finish pending graphs, then one transfer
        torch_xla._XLAC._xla_sync_multi(moved, devices=[], wait=True, sync_xla_data=False)
        for i, t in zip(xla, torch_xla._XLAC._xla_get_cpu_tensors(moved), strict=True):
            out[i] = t
    cuda = [i for i, t in enumerate(tensors) if t.device.type == "cuda"]
    if cuda:
        for i in cuda:
            out[i] = tensors[i].to("cpu", non_blocking=True)
        for d in {tensors[i].device for i in cuda}:  # the GPUs the copies come from, not the current one
            torch.cuda.synchronize(d)
    for i, t in enumerate(out):  # any other device (mps): one by one
        if t.device.type != "cpu":
            out[i] = t.cpu()
    return out
