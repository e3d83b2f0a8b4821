"""Build artifacts on disk: atomic writes, content hashes and the per-profile manifest."""

from artifacts.atomic import atomic_directory, atomic_file
from artifacts.manifest import ArtifactRecord, Manifest, file_sha256, library_versions

__all__ = ["ArtifactRecord", "Manifest", "atomic_directory", "atomic_file", "file_sha256", "library_versions"]
