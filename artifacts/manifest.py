"""`manifest.json`: what was built, from what, with which libraries.

An artifact is reused only when the manifest's key (profile, weights hash, library versions, builder version)
equals the one the current run would write and every recorded file still has its recorded sha256; anything
else is stale and is rebuilt.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from artifacts.atomic import atomic_file

MANIFEST_NAME = "manifest.json"
_TRACKED_LIBRARIES = ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "onnx-graphsurgeon", "tensorrt")


def library_versions(names=_TRACKED_LIBRARIES) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def file_sha256(path: "str | Path", chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class ArtifactRecord:
    path: str  # relative to the manifest's directory
    role: str
    sha256: str


@dataclass
class Manifest:
    """key: everything the artifacts depend on; artifacts: role -> record."""

    key: dict
    artifacts: dict[str, ArtifactRecord] = field(default_factory=dict)

    @classmethod
    def load(cls, directory: "str | Path") -> "Manifest | None":
        path = Path(directory) / MANIFEST_NAME
        try:
            raw = json.loads(path.read_text())
            records = {role: ArtifactRecord(**rec) for role, rec in raw["artifacts"].items()}
            return cls(raw["key"], records)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save(self, directory: "str | Path") -> None:
        body = json.dumps({"key": self.key, "artifacts": {r: asdict(a) for r, a in self.artifacts.items()}},
                          indent=2, sort_keys=True)
        with atomic_file(Path(directory) / MANIFEST_NAME) as tmp:
            tmp.write_text(body + "\n")

    def record(self, directory: "str | Path", role: str, path: "str | Path") -> None:
        """`path` is inside `directory` (absolute, or relative to the working directory), or relative to it."""
        path, directory = Path(path), Path(directory)
        try:
            rel = path.resolve().relative_to(directory.resolve())
        except ValueError:
            rel = path
        self.artifacts[role] = ArtifactRecord(str(rel), role, file_sha256(directory / rel))

    def is_fresh(self, directory: "str | Path", key: dict, roles) -> bool:
        """True when `key` matches and every role in `roles` exists with its recorded hash."""
        if self.key != key:
            return False
        for role in roles:
            rec = self.artifacts.get(role)
            if rec is None:
                return False
            path = Path(directory) / rec.path
            if not path.is_file() or file_sha256(path) != rec.sha256:
                return False
        return True
