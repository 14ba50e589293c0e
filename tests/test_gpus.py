"""GPU leases with real competing processes; the GPU count is overridden, no GPU needed."""

import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pynvml
import pytest

from specdec.job.gpus import GpuLeaseError, lease_gpus
from specdec.job.locks import LockRefused

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture
def no_visible_devices(monkeypatch):
    """A local run: nothing has set CUDA_VISIBLE_DEVICES; restored after the test."""
    for name in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "SPECDEC_NUM_GPUS"):
        monkeypatch.setenv(name, "placeholder")  # registers the original value for restoring
        monkeypatch.delenv(name)


def _spawn(code: str, lock_dir: Path, total: int, **env) -> subprocess.Popen:
    environment = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    environment.update(PYTHONPATH=SRC, SPECDEC_NUM_GPUS=str(total), SPECDEC_GPU_LOCK_DIR=str(lock_dir), **env)
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_visible_devices_from_slurm_are_used_as_given(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    lease = lease_gpus(2, lock_dir=tmp_path, total=8)
    assert [g.index for g in lease.gpus] == [3, 5]
    assert lease.source == "environment" and os.environ["CUDA_VISIBLE_DEVICES"] == "3,5"
    assert list(tmp_path.iterdir()) == []  # no locks taken


def test_too_few_given_devices_fail_clearly(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(GpuLeaseError, match=r"needs 2 GPU\(s\) but CUDA_VISIBLE_DEVICES='0' gives 1"):
        lease_gpus(2, lock_dir=tmp_path)


def test_cpu_job_takes_nothing(no_visible_devices, tmp_path):
    lease = lease_gpus(0, lock_dir=tmp_path, total=2)
    assert lease.gpus == [] and "CUDA_VISIBLE_DEVICES" not in os.environ


def test_more_gpus_than_the_machine_has_fails_at_once(no_visible_devices, tmp_path):
    with pytest.raises(GpuLeaseError, match=r"needs 3 GPU\(s\) but the machine has 2"):
        lease_gpus(3, lock_dir=tmp_path, total=2, timeout_s=3600)


def test_without_nvml_or_override_there_are_no_gpus(no_visible_devices, monkeypatch, tmp_path):
    def no_library():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", no_library)
    with pytest.raises(GpuLeaseError, match="machine has 0 .*NVML.*SPECDEC_NUM_GPUS"):
        lease_gpus(1, lock_dir=tmp_path)


def test_lease_pins_the_process_to_free_gpus(no_visible_devices, tmp_path):
    with lease_gpus(2, lock_dir=tmp_path, total=3, label="cell-a") as lease:
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
        assert os.environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        assert lease.describe()["gpus"] == [{"index": 0, "uuid": None}, {"index": 1, "uuid": None}]
        assert f"pid={os.getpid()} cell-a" in (tmp_path / "gpu0.lock").read_text()
        del os.environ["CUDA_VISIBLE_DEVICES"]
        with pytest.raises(GpuLeaseError, match=rf"no 2 free GPU\(s\) out of 3 .*GPU 0 by pid={os.getpid()} cell-a"):
            lease_gpus(2, lock_dir=tmp_path, total=3, timeout_s=0)
        with lease_gpus(1, lock_dir=tmp_path, total=3, timeout_s=0) as last:
            assert last.cuda_visible_devices == "2"


def test_competing_processes_never_share_a_gpu(tmp_path):
    """Five jobs want 2 GPUs each out of 3: they must take turns. While holding, each job
    claims its GPUs with exclusive-create marker files, which fails if another holds one too."""
    markers = tmp_path / "held"
    markers.mkdir()
    holder = f"""
        import os, time
        from specdec.job.gpus import lease_gpus
        lease = lease_gpus(2, timeout_s=120)
        names = [os.path.join({str(markers)!r}, f"gpu{{g.index}}") for g in lease.gpus]
        for name in names:
            os.close(os.open(name, os.O_CREAT | os.O_EXCL))  # FileExistsError: a GPU held twice
        time.sleep(0.3)
        for name in names:
            os.remove(name)
        print(os.environ["CUDA_VISIBLE_DEVICES"])
    """
    jobs = [_spawn(holder, tmp_path / "locks", total=3) for _ in range(5)]
    outputs = [job.communicate(timeout=120) for job in jobs]
    assert [job.returncode for job in jobs] == [0] * 5, [err for _, err in outputs]
    for out, _ in outputs:
        gpus = out.strip().split(",")
        assert len(set(gpus)) == 2 and set(gpus) <= {"0", "1", "2"}


def test_gpus_of_a_killed_holder_become_free(no_visible_devices, tmp_path):
    holder = _spawn(
        """
        import time
        from specdec.job.gpus import lease_gpus
        lease_gpus(2, label="doomed")
        print("held", flush=True)
        time.sleep(600)
        """,
        tmp_path,
        total=2,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(GpuLeaseError, match=f"pid={holder.pid} doomed"):
            lease_gpus(1, lock_dir=tmp_path, total=2, timeout_s=0)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    lease = lease_gpus(2, lock_dir=tmp_path, total=2, timeout_s=10)
    assert [g.index for g in lease.gpus] == [0, 1]
    lease.release()


def test_a_lock_file_planted_as_a_link_is_refused_and_its_target_untouched(no_visible_devices, tmp_path):
    """Another user who made the lock folder first points gpu0.lock at a file of yours: the
    lease must neither write into it nor change its mode."""
    yours = tmp_path / "yours.txt"
    yours.write_text("private\n")
    yours.chmod(0o600)
    (tmp_path / "locks").mkdir(mode=0o1777)
    (tmp_path / "locks" / "gpu0.lock").symlink_to(yours)
    with pytest.raises(LockRefused, match=r"lock file .*locks/gpu0.lock is a symbolic link"):
        lease_gpus(1, lock_dir=tmp_path / "locks", total=1, timeout_s=0)
    assert yours.read_text() == "private\n" and stat.S_IMODE(yours.stat().st_mode) == 0o600


def test_a_lock_file_that_is_a_hard_link_is_refused(no_visible_devices, tmp_path):
    yours = tmp_path / "yours.txt"
    yours.write_text("private\n")
    (tmp_path / "locks").mkdir()
    os.link(yours, tmp_path / "locks" / "gpu0.lock")
    with pytest.raises(LockRefused, match="gpu0.lock has other hard links"):
        lease_gpus(1, lock_dir=tmp_path / "locks", total=1, timeout_s=0)
    assert yours.read_text() == "private\n"


@pytest.mark.parametrize("mode, foreign, reason", [
    (0o777, False, r"is writable by others \(mode 0777\) without the sticky bit"),
    (0o775, False, r"is writable by others \(mode 0775\) without the sticky bit"),
    (0o1777, True, r"belongs to uid \d+, not to you \(uid \d+\) or root"),
])
def test_a_lock_folder_others_control_is_refused(no_visible_devices, monkeypatch, tmp_path, mode, foreign, reason):
    folder = tmp_path / "locks"
    folder.mkdir()
    folder.chmod(mode)
    if foreign and os.getuid() == 0:
        os.chown(folder, 4321, 4321)
    elif foreign:  # only root can give a folder away: be someone else instead
        monkeypatch.setattr(os, "getuid", lambda uid=os.getuid(): uid + 1)
    with pytest.raises(LockRefused, match=reason):
        lease_gpus(1, lock_dir=folder, total=1, timeout_s=0)
    assert list(folder.iterdir()) == []


def test_lock_files_and_a_new_lock_folder_follow_the_umask(no_visible_devices, tmp_path):
    original = os.umask(0o022)
    try:
        with lease_gpus(1, lock_dir=tmp_path / "new" / "locks", total=1):
            pass
    finally:
        os.umask(original)
    assert stat.S_IMODE((tmp_path / "new" / "locks").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "new" / "locks" / "gpu0.lock").stat().st_mode) == 0o644
