"""Multi-process training through nerfstudio's own DDP path, on CUDA (nccl) and on CPU (gloo): a harness for
the DDP test and benchmark (``ns-train --machine.num-devices N`` itself does not use this module).

``ns-train ... --machine.num-devices N`` runs ``nerfstudio.scripts.train.launch``, which spawns N
``_distributed_worker`` processes that each run ``train_loop``; ``VanillaPipeline`` wraps the model in
``DistributedDataParallel(find_unused_parameters=True)`` and only rank 0 writes checkpoints.

nerfstudio 1.1.5 only supports this on CUDA: ``_distributed_worker`` asserts that CUDA is available,
and ``VanillaPipeline`` passes ``device_ids=[local_rank]``, which torch rejects for CPU modules.
:func:`launch` keeps nerfstudio's launcher for CUDA (and for a single process) and, for several CPU
processes, runs the same worker steps with gloo (:func:`launch_cpu`), so tests and smoke runs
exercise the real ``train_loop`` / ``Trainer`` / ``VanillaPipeline`` / DDP code without GPUs.

:class:`RecordingTrainLoop` is nerfstudio's ``train_loop`` plus a per-rank record written at the end
of training (``rank<r>.pt``): time and loss of every iteration, codebook-attention calls per
iteration, DDP's settings and every buffer/parameter broadcast it issued, checkpoint files this rank
wrote, initial and final parameters, and optionally the local and synchronised gradients.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from nerfstudio.engine.trainer import Trainer, TrainerConfig
from nerfstudio.pipelines import base_pipeline
from nerfstudio.scripts import train as ns_train
from nerfstudio.utils import comms
from torch.nn.parallel import DistributedDataParallel

from cocoinr_nerfstudio.field_components.attention import CodebookAttention

TrainLoop = Callable[[int, int, TrainerConfig, int], Any]
StartMethod = Literal["spawn", "forkserver"]


# ----------------------------------------------------------------------------- launching
def launch(
    main_func: TrainLoop,
    config: TrainerConfig,
    num_processes: int,
    device_type: Literal["cpu", "cuda"],
    dist_url: str = "auto",
    timeout: timedelta = ns_train.DEFAULT_TIMEOUT,
    cpu_start_method: StartMethod = "spawn",
) -> None:
    """Runs ``main_func`` the way ``ns-train --machine.num-devices num_processes`` runs ``train_loop``.

    CUDA, or a single process: nerfstudio's own ``launch``. Several CPU processes: :func:`launch_cpu`.
    """
    if device_type == "cpu" and num_processes > 1:
        launch_cpu(main_func, config, num_processes, dist_url=dist_url, timeout=timeout, start_method=cpu_start_method)
    else:
        ns_train.launch(
            main_func,
            num_devices_per_machine=num_processes,
            dist_url=dist_url,
            config=config,
            timeout=timeout,
            device_type=device_type,
        )


def launch_cpu(
    main_func: TrainLoop,
    config: TrainerConfig,
    num_processes: int,
    dist_url: str = "auto",
    timeout: timedelta = ns_train.DEFAULT_TIMEOUT,
    start_method: StartMethod = "spawn",
) -> None:
    """``num_processes`` CPU workers on this machine, joined by gloo; raises if any worker fails.

    ``spawn`` starts fresh interpreters, as nerfstudio does. ``forkserver`` hands the workers the same
    pickled arguments but forks them from a server process that has already imported nerfstudio and
    this package (once per calling process), so repeated launches start in a second rather than
    re-importing nerfstudio in every worker. (Plain ``fork`` is not offered: a worker forked from a
    process that already ran multi-threaded torch CPU ops can hang in OpenMP.)
    """
    if num_processes < 2:
        raise ValueError(f"launch_cpu needs at least 2 processes, got {num_processes}")
    if start_method not in ("spawn", "forkserver"):
        raise ValueError(f"start_method must be 'spawn' or 'forkserver', got {start_method!r}")
    if start_method == "forkserver":
        multiprocessing.get_context("forkserver").set_forkserver_preload([__name__])
    if dist_url == "auto":
        dist_url = f"tcp://127.0.0.1:{ns_train._find_free_port()}"
    mp.start_processes(
        _cpu_distributed_worker,
        args=(main_func, num_processes, dist_url, config, timeout),
        nprocs=num_processes,
        join=True,
        start_method=start_method,
    )


def _cpu_distributed_worker(
    local_rank: int,
    main_func: TrainLoop,
    world_size: int,
    dist_url: str,
    config: TrainerConfig,
    timeout: timedelta,
) -> Any:
    """nerfstudio's ``_distributed_worker`` for one CPU machine: gloo instead of nccl, no CUDA checks.

    Each worker gets an equal share of the cores, so the processes do not oversubscribe them.
    """
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group(
        backend="gloo", init_method=dist_url, world_size=world_size, rank=local_rank, timeout=timeout
    )
    assert comms.LOCAL_PROCESS_GROUP is None
    comms.LOCAL_PROCESS_GROUP = dist.new_group(list(range(world_size)))
    with cpu_ddp_in_pipelines():
        output = main_func(local_rank, world_size, config, local_rank)
    comms.synchronize()
    dist.destroy_process_group()
    return output


class _CpuCompatibleDDP(DistributedDataParallel):
    """DDP that drops ``device_ids`` for CPU modules (torch only accepts them for single-GPU modules)."""

    def __init__(self, module: torch.nn.Module, device_ids=None, output_device=None, **kwargs) -> None:
        if all(p.device.type == "cpu" for p in module.parameters()):
            device_ids, output_device = None, None
        super().__init__(module, device_ids=device_ids, output_device=output_device, **kwargs)


@contextlib.contextmanager
def cpu_ddp_in_pipelines() -> Iterator[None]:
    """Lets ``VanillaPipeline`` wrap CPU models in DDP; everything else it does is unchanged."""
    original = base_pipeline.DDP
    base_pipeline.DDP = _CpuCompatibleDDP  # also what base_pipeline.module_wrapper checks against
    try:
        yield
    finally:
        base_pipeline.DDP = original


# ----------------------------------------------------------------------------- recording
@dataclass
class RecordingTrainLoop:
    """nerfstudio's ``train_loop``, unchanged, with each rank's record saved to ``output_dir/rank<r>.pt``.

    Picklable, so it can be handed to ``launch`` like ``train_loop`` itself.
    """

    output_dir: Path
    gradient_steps: int = 0
    """Record local (pre-all-reduce) and synchronised gradients for the first this many steps."""
    save_parameters: bool = True
    """Record every parameter and buffer before the first step and after training."""

    def __call__(self, local_rank: int, world_size: int, config: TrainerConfig, global_rank: int = 0) -> None:
        recorder = _RankRecorder(self, global_rank, world_size)
        with recorder.installed():
            ns_train.train_loop(local_rank, world_size, config, global_rank)


def _storage_ptr(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


class _RankRecorder:
    def __init__(self, loop: RecordingTrainLoop, rank: int, world_size: int) -> None:
        self.loop = loop
        self.rank = rank
        self.world_size = world_size
        self.step: int | str = "setup"
        self.record: dict[str, Any] = {
            "rank": rank,
            "world_size": world_size,
            "steps": [],
            "broadcasts": [],
            "checkpoints_written": [],
        }

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        recorder = self
        original_broadcast = dist._broadcast_coalesced
        original_save = torch.save
        original_train = Trainer.train

        def broadcast(process_group, tensors, buffer_size, src=0):
            tensors = list(tensors)
            entry = {
                "step": recorder.step,
                "num_tensors": len(tensors),
                "bytes": sum(t.numel() * t.element_size() for t in tensors),
                "storages": [_storage_ptr(t) for t in tensors],
            }
            if recorder.step == "setup":  # DDP's initial sync: what each rank held before, and after
                entry["sums_before"] = [float(t.double().sum()) for t in tensors]
            original_broadcast(process_group, tensors, buffer_size, src)
            if recorder.step == "setup":
                entry["sums_after"] = [float(t.double().sum()) for t in tensors]
            recorder.record["broadcasts"].append(entry)

        def save(obj, f, *args, **kwargs):
            if isinstance(f, str | Path) and str(f).endswith(".ckpt"):
                recorder.record["checkpoints_written"].append(str(f))
            return original_save(obj, f, *args, **kwargs)

        def train(trainer: Trainer) -> None:
            recorder.attach(trainer)
            original_train(trainer)
            recorder.finish(trainer, original_save)

        dist._broadcast_coalesced = broadcast
        torch.save = save
        Trainer.train = train  # type: ignore[method-assign]
        try:
            yield
        finally:
            dist._broadcast_coalesced = original_broadcast
            torch.save = original_save
            Trainer.train = original_train  # type: ignore[method-assign]

    def _synchronize(self, trainer: Trainer) -> None:
        if str(trainer.device).startswith("cuda"):
            torch.cuda.synchronize(trainer.device)

    def attach(self, trainer: Trainer) -> None:
        model = trainer.pipeline.model
        wrapped = trainer.pipeline._model
        ddp = wrapped if isinstance(wrapped, DistributedDataParallel) else None
        self.record["device"] = str(trainer.device)
        self.record["rays_per_batch"] = trainer.pipeline.datamanager.get_train_rays_per_batch()
        self.record["ddp"] = None
        if ddp is not None:
            self.record["ddp"] = {
                "parameters_to_ignore": sorted(ddp.parameters_to_ignore),
                "synced_buffers": sorted(ddp.named_module_buffers),
                "find_unused_parameters": bool(ddp.find_unused_parameters),
                "syncs_buffers_each_forward": bool(ddp.will_sync_module_buffers()),
            }
        self.record["buffer_storages"] = {name: _storage_ptr(b) for name, b in model.named_buffers()}
        self.record["buffer_bytes"] = {name: b.numel() * b.element_size() for name, b in model.named_buffers()}
        if self.loop.save_parameters:
            self.record["initial_state"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

        attention_calls = [0]
        for module in model.modules():
            if isinstance(module, CodebookAttention):
                module.register_forward_hook(lambda *_: attention_calls.__setitem__(0, attention_calls[0] + 1))

        original_iteration = trainer.train_iteration
        named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

        def train_iteration(step: int):
            self.step = step
            local: dict[str, torch.Tensor] = {}
            handles = []
            if step < self.loop.gradient_steps:
                for name, param in named_params:

                    def keep(grad: torch.Tensor, name: str = name) -> None:
                        local[name] = grad.detach().clone() + local.get(name, 0)

                    handles.append(param.register_hook(keep))
            calls_before = attention_calls[0]
            self._synchronize(trainer)
            start = time.perf_counter()
            loss, loss_dict, metrics_dict = original_iteration(step)
            self._synchronize(trainer)
            seconds = time.perf_counter() - start
            for handle in handles:
                handle.remove()
            entry: dict[str, Any] = {
                "step": step,
                "seconds": seconds,
                "loss": float(loss.detach()),
                "losses": {k: float(v.detach()) for k, v in loss_dict.items()},
                "codebook_attention_calls": attention_calls[0] - calls_before,
            }
            if step < self.loop.gradient_steps:
                entry["local_gradients"] = {k: v.cpu() for k, v in local.items()}
                entry["synced_gradients"] = {
                    n: p.grad.detach().cpu().clone() for n, p in named_params if p.grad is not None
                }
            self.record["steps"].append(entry)
            self.step = f"after {step}"
            return loss, loss_dict, metrics_dict

        trainer.train_iteration = train_iteration  # type: ignore[method-assign]

    def finish(self, trainer: Trainer, save: Callable[..., None]) -> None:
        if self.loop.save_parameters:
            model = trainer.pipeline.model
            self.record["final_state"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        self.loop.output_dir.mkdir(parents=True, exist_ok=True)
        save(self.record, self.loop.output_dir / f"rank{self.rank}.pt")


def load_records(output_dir: Path, world_size: int) -> list[dict[str, Any]]:
    """The ``rank<r>.pt`` records of one :class:`RecordingTrainLoop` run, in rank order."""
    return [torch.load(Path(output_dir) / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
