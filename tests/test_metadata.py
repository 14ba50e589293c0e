import json
import re
from datetime import datetime, timezone

from specdec import metadata
from specdec.metadata import accelerator, collect_metadata, cpu_model, git_commit

KEYS = {"specdec", "python", "torch", "transformers", "vllm", "packages", "cuda", "driver", "devices", "cpu", "host",
        "git_commit", "seed", "started_at", "finished_at"}


def test_collect_metadata_fields(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value_123")
    started = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    meta = collect_metadata(1234, started, "2026-01-02T03:05:00+00:00")
    assert set(meta) == KEYS
    assert meta["seed"] == 1234
    assert meta["started_at"] == "2026-01-02T03:04:05+00:00"
    assert meta["finished_at"] == "2026-01-02T03:05:00+00:00"
    assert meta["torch"] and meta["transformers"] and meta["specdec"] == "0.1.0"
    assert "hf_secret_value_123" not in json.dumps(meta)


def test_reported_versions_are_the_locked_ones():
    """What result.json reports is what requirements.lock pins (and so what CI tested)."""
    from pathlib import Path

    lock = Path(__file__).resolve().parents[1] / "requirements.lock"
    pins = dict(line.split("==") for line in lock.read_text().splitlines() if "==" in line and not line.startswith("#"))
    pins = {name.lower(): version for name, version in pins.items()}
    meta = collect_metadata(1, "2026-01-02T03:04:05+00:00")
    assert meta["transformers"] == pins["transformers"]
    assert meta["packages"] == {name: pins[name] for name in metadata.PACKAGES}


def test_git_commit_inside_and_outside_a_repository(tmp_path):
    assert re.fullmatch(r"[0-9a-f]{40}", git_commit())  # this worktree
    assert git_commit(tmp_path) is None
    assert git_commit(tmp_path / "missing") is None


def test_cpu_model_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test CPU @ 3.0GHz\nflags\t: x\n")
    assert cpu_model(cpuinfo) == "Test CPU @ 3.0GHz"


def test_no_gpu_means_null_cuda_and_cpu_device(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert accelerator() == (None, ["cpu"])
    meta = collect_metadata(None, "2026-01-02T03:04:05+00:00")
    assert meta["cuda"] is None and meta["driver"] is None and meta["devices"] == ["cpu"]


def test_driver_is_null_when_nvml_fails(monkeypatch):
    import pynvml

    def fail():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", fail)
    assert metadata.nvidia_driver() is None
