"""Versioned adapter registry on disk: immutable versions, an atomic CURRENT pointer, sha256 checks.

Layout under `root`:
    v0001/manifest.json  v0001/adapter/adapter_model.safetensors ...   (one folder per version, immutable)
    CURRENT.json  {"version": "v0002", "previous": ["v0001"], "updated_at": ...}   (what the servers serve)
    WITHDRAWN.json  {"v0001": {"reason": "learned document d7, since deleted", "at": ...}}   (never served again)
Every write goes to a temp name, is fsynced, then renamed, so a crash leaves the old state or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kfresh.core.errors import InvalidInput, NotFound
from kfresh.core.files import fsync_dir, sha256_file
from kfresh.finetuner.facts import FACTS_FILE, read_facts

WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass(frozen=True)
class AdapterManifest:
    version: str
    parent: str | None
    base_model: str
    base_model_sha256: str
    training_data_sha256: str
    weights_sha256: str
    created_at: float
    gate_passed: bool
    metrics: dict[str, Any] = field(default_factory=dict)
    facts: int = 0
    notes: str = ""

    @property
    def served_name(self) -> str:
        """Name under which vLLM serves this version: new per version, so no stale prefix cache is reused."""
        return f"kfresh-{self.version}"


def weights_sha256(adapter_dir: Path) -> str:
    """One digest over every weight file of an adapter folder (names and contents, in name order)."""
    files = sorted(p for p in adapter_dir.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise InvalidInput(f"{adapter_dir} holds no adapter weights ({', '.join(WEIGHT_SUFFIXES)})")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(adapter_dir).as_posix().encode())
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class AdapterRegistry:
    """Publish, list, promote and roll back adapter versions. Safe for threads in one process."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    # -- reads -------------------------------------------------------------------------------------
    def versions(self) -> list[str]:
        """Published versions, oldest first (names only: no manifest is read)."""
        return [f.name for f in sorted(self.root.glob("v[0-9]*")) if (f / "manifest.json").is_file()]

    def list(self) -> list[AdapterManifest]:
        return [self.get(version) for version in self.versions()]

    def get(self, version: str) -> AdapterManifest:
        manifest = self.root / version / "manifest.json"
        if not manifest.is_file():
            raise NotFound(f"adapter version {version!r} is not in the registry at {self.root}")
        return AdapterManifest(**json.loads(manifest.read_text()))

    def adapter_dir(self, version: str) -> Path:
        return self.root / version / "adapter"

    def verified_dir(self, version: str) -> Path:
        """The adapter folder, only if its weights still match the manifest's sha256."""
        manifest = self.get(version)
        folder = self.adapter_dir(version)
        actual = weights_sha256(folder)
        if actual != manifest.weights_sha256:
            raise InvalidInput(
                f"adapter {version} weights sha256 {actual[:12]} != manifest {manifest.weights_sha256[:12]}: refusing to load"
            )
        return folder

    def withdrawn(self) -> dict[str, dict[str, Any]]:
        """Versions that must not be served again (they learned a document since deleted or replaced) and why."""
        path = self.root / "WITHDRAWN.json"
        return dict(json.loads(path.read_text())) if path.is_file() else {}

    def learned(self, version: str) -> dict[str, int]:
        """doc_id -> the document version the adapter `version` learned (from its facts.jsonl; {} without one)."""
        return {f.doc_id: f.version for f in read_facts(self.adapter_dir(version) / FACTS_FILE) if f.doc_id}

    def pointer(self) -> dict[str, Any]:
        path = self.root / "CURRENT.json"
        return json.loads(path.read_text()) if path.is_file() else {"version": None, "previous": []}

    def current(self) -> AdapterManifest | None:
        version = self.pointer().get("version")
        return self.get(version) if version else None

    # -- writes ------------------------------------------------------------------------------------
    def publish(
        self,
        adapter_dir: Path,
        *,
        base_model: str,
        base_model_sha256: str,
        training_data_sha256: str,
        gate_passed: bool,
        metrics: dict[str, Any] | None = None,
        facts: int = 0,
        notes: str = "",
        promote: bool = True,
    ) -> AdapterManifest:
        """Copy a trained adapter in as the next version. Only gate-passing adapters are accepted."""
        if not gate_passed:
            raise InvalidInput("only an adapter that passed the gate can be published")
        with self._lock:
            existing = self.list()
            version = f"v{(int(existing[-1].version[1:]) + 1) if existing else 1:04d}"
            current = self.pointer().get("version")
            staging = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=self.root))
            shutil.copytree(adapter_dir, staging / "adapter")
            manifest = AdapterManifest(
                version=version,
                parent=current,
                base_model=base_model,
                base_model_sha256=base_model_sha256,
                training_data_sha256=training_data_sha256,
                weights_sha256=weights_sha256(staging / "adapter"),
                created_at=time.time(),
                gate_passed=True,
                metrics=metrics or {},
                facts=facts,
                notes=notes,
            )
            _write_json_atomic(staging / "manifest.json", asdict(manifest))
            os.replace(staging, self.root / version)
            fsync_dir(self.root)
            if promote:
                self._set_current(version)
            return manifest

    def promote(self, version: str) -> AdapterManifest:
        """Make `version` the served one (it must exist, verify, and not be withdrawn)."""
        with self._lock:
            self.verified_dir(version)
            why = self.withdrawn().get(version)
            if why:
                raise InvalidInput(f"adapter {version} was withdrawn ({why['reason']}): it cannot be served again")
            self._set_current(version)
            return self.get(version)

    def withdraw(self, reasons: dict[str, str]) -> dict[str, Any]:
        """Withdraw versions (version -> reason) for good: they leave the rollback history, and when one is served the
        newest earlier version still allowed is served instead (the base model when none is). Returns the pointer."""
        with self._lock:
            withdrawn = self.withdrawn()
            now = time.time()
            fresh = {v: r for v, r in reasons.items() if v not in withdrawn}
            if fresh:
                withdrawn.update({v: {"reason": r, "at": now} for v, r in fresh.items()})
                _write_json_atomic(self.root / "WITHDRAWN.json", withdrawn)
            pointer = self.pointer()
            previous = [v for v in pointer.get("previous", []) if v not in withdrawn]
            target = pointer.get("version")
            if target in withdrawn:
                target = previous.pop() if previous else None
            if target != pointer.get("version") or previous != list(pointer.get("previous", [])):
                pointer = {"version": target, "previous": previous, "updated_at": now}
                _write_json_atomic(self.root / "CURRENT.json", pointer)
            return pointer

    def rollback(self) -> AdapterManifest | None:
        """Serve the previously served version again (None = the base model)."""
        with self._lock:
            pointer = self.pointer()
            previous = list(pointer.get("previous", []))
            target = previous.pop() if previous else None
            _write_json_atomic(
                self.root / "CURRENT.json", {"version": target, "previous": previous, "updated_at": time.time()}
            )
            return self.get(target) if target else None

    def _set_current(self, version: str) -> None:
        pointer = self.pointer()
        previous = list(pointer.get("previous", []))
        if pointer.get("version") and pointer["version"] != version:
            previous.append(pointer["version"])
        _write_json_atomic(
            self.root / "CURRENT.json", {"version": version, "previous": previous, "updated_at": time.time()}
        )
