"""GPU leases for local runs: pin each benchmark job to GPUs no other job holds.

Snakemake's `resources: gpu=N` only counts; it never sets CUDA_VISIBLE_DEVICES for local
jobs, so every job would otherwise see (and use) GPU 0. `lease_gpus(k)` takes a
non-blocking `fcntl.flock` on one lock file per physical GPU until it holds k of them, then
sets CUDA_VISIBLE_DEVICES before CUDA initialises. The kernel drops the locks when the
process exits, however it exits (SIGKILL included), so a crashed job never strands a GPU.
Under SLURM (CUDA_VISIBLE_DEVICES already set) the job uses what it was given.

The lock folder must be yours or root's (`locks.safe_folder`): to share GPUs between users,
root makes one with mode 1777 (as /tmp) and every user names it in SPECDEC_GPU_LOCK_DIR.

Call it first thing in the job, before anything touches CUDA.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pynvml

from specdec.job.locks import holder, open_lock, safe_folder, sign, try_lock

DEFAULT_LOCK_DIR = "/tmp/specdec-gpu-locks"  # must be local to the machine: flock over NFS is unreliable
DEFAULT_TIMEOUT_S = 1800.0
POLL_S = 0.2
# Open lock files of every lease in this process: a lease the caller drops must not be
# garbage-collected (closing its files would free the GPUs while the job still runs).
_HELD: list = []


class GpuLeaseError(ValueError):
    """Not enough GPUs for a job (a placement that needs a GPU on a machine without one), or
    CUDA already initialised before pinning: one line, as any bad input."""


@dataclass(frozen=True)
class LeasedGpu:
    index: int  # physical index (NVML / PCI bus order)
    uuid: str | None


@dataclass
class GpuLease:
    """GPUs this process may use. `source` is "lease" (locks held here), "environment"
    (CUDA_VISIBLE_DEVICES given, e.g. by SLURM) or "none" (k == 0)."""

    gpus: list[LeasedGpu]
    source: str
    cuda_visible_devices: str | None
    lock_dir: str | None = None
    _handles: list = field(default_factory=list, repr=False)

    def describe(self) -> dict:
        """JSON-ready record of the physical GPUs this job used."""
        return {
            "source": self.source,
            "cuda_visible_devices": self.cuda_visible_devices,
            "gpus": [{"index": g.index, "uuid": g.uuid} for g in self.gpus],
        }

    def release(self) -> None:
        """Drop the locks early (they drop by themselves when the process exits)."""
        for handle in self._handles:
            _HELD.remove(handle)
            handle.close()
        self._handles.clear()

    def __enter__(self) -> GpuLease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lease_gpus(
    k: int,
    lock_dir: str | os.PathLike | None = None,
    total: int | None = None,
    timeout_s: float | None = None,
    label: str = "",
) -> GpuLease:
    """Hold k GPUs for this process and make them its CUDA_VISIBLE_DEVICES.

    `total` (else env SPECDEC_NUM_GPUS, else NVML's count) is the machine's GPU count;
    `lock_dir` (else env SPECDEC_GPU_LOCK_DIR, else /tmp/specdec-gpu-locks) holds one lock
    file per GPU; `timeout_s` (else env SPECDEC_GPU_LEASE_TIMEOUT_S, else 1800) is how long
    to wait for k free GPUs; `label` (e.g. the cell id) is written into held lock files so
    that a waiting job can say who holds them.
    """
    if k < 0:
        raise ValueError(f"cannot lease {k} GPUs")
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return _from_environment(k, given)
    if k == 0:
        return GpuLease([], "none", None)
    _refuse_if_cuda_initialised()

    total, how = (total, "argument") if total is not None else _gpu_count()
    if k > total:
        raise GpuLeaseError(f"this job needs {k} GPU(s) but the machine has {total} ({how})")
    lock_dir = Path(lock_dir or os.environ.get("SPECDEC_GPU_LOCK_DIR", DEFAULT_LOCK_DIR))
    if timeout_s is None:
        timeout_s = float(os.environ.get("SPECDEC_GPU_LEASE_TIMEOUT_S", DEFAULT_TIMEOUT_S))

    folder = safe_folder(lock_dir)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            held = _try_lock(k, total, folder, lock_dir, label)
            if held is not None:
                break
            if time.monotonic() >= deadline:
                raise GpuLeaseError(
                    f"no {k} free GPU(s) out of {total} after waiting {timeout_s:g} s; "
                    f"held: {_holders(folder, lock_dir, total)} (lock files in {lock_dir})"
                )
            time.sleep(POLL_S)
    finally:
        os.close(folder)

    indices = sorted(held)
    # Indices in NVML's (PCI bus) order, so that CUDA numbers GPUs the way the lock files do.
    os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, indices))
    uuids = _nvml_uuids(indices)
    handles = [held[i] for i in indices]
    _HELD.extend(handles)
    return GpuLease(
        [LeasedGpu(i, uuids.get(i)) for i in indices],
        "lease",
        os.environ["CUDA_VISIBLE_DEVICES"],
        str(lock_dir),
        handles,
    )


def _from_environment(k: int, given: str) -> GpuLease:
    devices = [d.strip() for d in given.split(",") if d.strip()]
    if len(devices) < k:
        raise GpuLeaseError(
            f"this job needs {k} GPU(s) but CUDA_VISIBLE_DEVICES={given!r} gives {len(devices)}"
        )
    numeric = [int(d) for d in devices if d.isdigit()]
    uuids = _nvml_uuids(numeric)
    gpus = [
        LeasedGpu(int(d), uuids.get(int(d))) if d.isdigit() else LeasedGpu(-1, d)  # a UUID or MIG id
        for d in devices
    ]
    return GpuLease(gpus, "environment", given)


def _try_lock(k: int, total: int, folder: int, lock_dir: Path, label: str) -> dict | None:
    """Lock k free GPUs at once, or none: a partial set is released before waiting, so two
    jobs can never each hold half of what the other needs."""
    held = {}
    for index in range(total):
        handle = open_lock(folder, lock_dir, f"gpu{index}.lock")
        if not try_lock(handle):
            handle.close()
            continue
        held[index] = handle
        if len(held) == k:
            for handle in held.values():
                sign(handle, label)
            return held
    for handle in held.values():
        handle.close()
    return None


def _holders(folder: int, lock_dir: Path, total: int) -> str:
    """Who holds each GPU, from what holders wrote into the lock files."""
    busy = []
    for index in range(total):
        with open_lock(folder, lock_dir, f"gpu{index}.lock") as handle:
            if not try_lock(handle):
                busy.append(f"GPU {index} by {holder(handle)}")
    return "; ".join(busy) or "none (GPUs freed just now)"


def _refuse_if_cuda_initialised() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        raise GpuLeaseError("CUDA is already initialised: lease GPUs before any CUDA call")


def _gpu_count() -> tuple[int, str]:
    override = os.environ.get("SPECDEC_NUM_GPUS")
    if override is not None:
        if not override.isdigit():
            raise GpuLeaseError(f"SPECDEC_NUM_GPUS must be a whole number, got {override!r}")
        return int(override), "SPECDEC_NUM_GPUS"

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as error:
        return 0, f"NVML: {error}; set SPECDEC_NUM_GPUS to override"
    try:
        return pynvml.nvmlDeviceGetCount(), "NVML"
    finally:
        pynvml.nvmlShutdown()


def _nvml_uuids(indices: list[int]) -> dict[int, str]:
    """UUIDs of physical GPUs by index; empty where NVML is unavailable."""

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return {}
    try:
        return {i: pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i)) for i in indices}
    except pynvml.NVMLError:
        return {}
    finally:
        pynvml.nvmlShutdown()
