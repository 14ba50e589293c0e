"""Content fingerprints (sha256) of the model folders and dataset files a cell reads.

A result records them (`metadata.inputs`), and the workflow gives each rule that reads a local
model folder its fingerprint as a param, so that replaced weights rerun exactly the cells that
use them, whatever the files' modification times say.

Hashing a model folder reads all of it (0.5 GB for the embedded model), so each file's digest
is cached under the file's identity: device, inode, size, modification and change time (ns).
Writing a file's content, or replacing it, moves its change time, which no tool can set back;
an unchanged file is never read twice. The cache is one JSON file per user, beside other
tools' caches (`$XDG_CACHE_HOME/specdec/fingerprints.json`, by default under ~/.cache), so a
model is hashed once per machine however many studies use it; concurrent jobs may lose each
other's entries, which only costs a rehash.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from huggingface_hub import snapshot_download

from specdec.gate.cells import Cell, ModelSpec
from specdec.io import write_json

_CHUNK = 1 << 20


class DigestCache:
    """File path -> sha256 of its content, kept while the file's identity stays the same."""

    def __init__(self, path: str | os.PathLike | None = None):
        cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        self.path = Path(path) if path is not None else Path(cache_home) / "specdec" / "fingerprints.json"
        self.entries = self._stored()
        self.changed = False

    def _stored(self) -> dict:
        try:
            entries = json.loads(self.path.read_text())
        except (OSError, ValueError):  # none yet, or unreadable: start again
            return {}
        return entries if isinstance(entries, dict) else {}

    def file_digest(self, path: Path) -> str:
        stat = path.stat()
        key = str(path.resolve())
        identity = [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]
        entry = self.entries.get(key)
        if isinstance(entry, dict) and entry.get("identity") == identity and isinstance(entry.get("sha256"), str):
            return entry["sha256"]
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
        self.entries[key] = {"identity": identity, "sha256": digest.hexdigest()}
        self.changed = True
        return digest.hexdigest()

    def digest(self, path: str | os.PathLike) -> str | None:
        """A file's sha256, or a folder's: over the sorted relative paths and digests of its
        files (hidden ones such as `.cache/` left out: tools' bookkeeping, not the model).
        None for a path that does not exist or cannot be read (the job that reads it says why)."""
        try:
            return self._digest(Path(path))
        except OSError:
            return None

    def _digest(self, path: Path) -> str | None:
        if path.is_file():
            return self.file_digest(path)
        if not path.is_dir():
            return None
        files = sorted(
            file.relative_to(path)
            for file in path.rglob("*")
            if file.is_file() and not any(part.startswith(".") for part in file.relative_to(path).parts)
        )
        folder = hashlib.sha256()
        for name in files:
            folder.update(f"{name.as_posix()}\0{self.file_digest(path / name)}\n".encode())
        return folder.hexdigest()

    def save(self) -> None:
        """Add what was hashed to the stored cache (others' entries since kept). A cache that
        cannot be written (a read-only home) is only a cache: the digests stand."""
        if not self.changed:
            return
        try:
            write_json(self.path, self._stored() | self.entries)
        except OSError:
            return
        self.changed = False


def model_folder(spec: ModelSpec, models_dir: str | os.PathLike) -> Path | None:
    """The folder a model loads from: prepared (embedded), configured (local), or the hub
    cache's snapshot of its id and revision (None if not downloaded)."""
    if spec.source == "embedded":
        return Path(models_dir) / spec.name
    if spec.source == "local":
        return Path(spec.path)

    try:
        return Path(snapshot_download(spec.id, revision=spec.revision, local_files_only=True))
    except Exception:  # not in the cache (yet): the load fetches it or says why
        return None


def cell_inputs(cell: Cell, models_dir: str | os.PathLike, prompts: str | os.PathLike,
                dataset_files: list[str | os.PathLike]) -> dict:
    """The `inputs` block of a result's metadata: each model folder, the prompts file and
    the dataset files the prompts were prepared from, with their sha256."""
    cache = DigestCache()
    roles = {"target": cell.target, "drafter": cell.drafter_model}
    models = {}
    for role, spec in roles.items():
        if spec is not None:
            folder = model_folder(spec, models_dir)
            models[role] = {"name": spec.name, "source": spec.source, "path": str(folder) if folder else None,
                            "sha256": cache.digest(folder) if folder else None}
    inputs = {
        "models": models,
        "prompts": {"path": str(prompts), "sha256": cache.digest(prompts)},
        "dataset_files": [{"path": str(path), "sha256": cache.digest(path)} for path in dataset_files],
    }
    cache.save()
    return inputs
