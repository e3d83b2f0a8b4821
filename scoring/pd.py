"""The hackathon's PD score: L2 distance between the 2048-d pool3 Inception features of two JPEG files.

As in the hackathon's compute_score.py (design.md part 2 (b)): pytorch-fid's InceptionV3 with the FID weights
(use_fid_inception=True, block 3), each image opened with PIL `.convert('RGB')` and scaled to [0, 1] like
torchvision's ToTensor, one image per batch; PD = ||f(result) - f(reference)||_2. PD > 12 fails.

pytorch-fid needs torchvision (absent on CPU CI) and downloads its weights from a URL; there is no network when
grading, so the user supplies the weights file and it is served to pytorch-fid from a temporary torch.hub
checkpoint folder (the place load_state_dict_from_url looks before downloading). Without any of these, PD is
reported as unavailable with the reason, and the rest of the score still runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from profiles.errors import ControlNetRTError

PD_THRESHOLD = 12.0  # preliminary_round.md: "PD score > 12 means accuracy fails" (applied per image)
FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_FEATURE_DIM = 2048


@dataclass(frozen=True)
class PDUnavailable:
    reason: str

    @property
    def message(self) -> str:
        return f"PD unavailable: {self.reason}"


def pd_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(features_a, np.float64) - np.asarray(features_b, np.float64)))


def fid_input(path: "str | Path"):
    """(1, 3, H, W) float32 in [0, 1]: PIL .convert('RGB') then exactly torchvision's ToTensor arithmetic."""
    import torch
    from PIL import Image

    with Image.open(path) as img:
        rgb = np.array(img.convert("RGB"), dtype=np.uint8, copy=True)
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous().to(torch.get_default_dtype()).div(255)[None]


@dataclass
class PDScorer:
    model: object  # pytorch_fid.inception.InceptionV3, eval, on `device`
    device: str
    notes: list[str] = field(default_factory=list)

    def features(self, path: "str | Path") -> np.ndarray:
        import torch

        with torch.no_grad():
            pool3 = self.model(fid_input(path).to(self.device))[0]
        return pool3.squeeze(3).squeeze(2)[0].double().cpu().numpy()

    def distance(self, result_path: "str | Path", reference_path: "str | Path") -> float:
        return pd_distance(self.features(result_path), self.features(reference_path))


def _import_pytorch_fid():
    """-> the pytorch_fid.inception module, or PDUnavailable saying why not."""
    try:
        import torchvision  # noqa: F401  - pytorch-fid imports it at module level
    except Exception as exc:  # a torchvision built for another torch raises more than ImportError
        return PDUnavailable(f"pytorch-fid needs torchvision, which is not importable here "
                             f"({type(exc).__name__}: {exc}); install a torchvision matching torch")
    try:
        from pytorch_fid import inception
    except Exception as exc:
        return PDUnavailable(f"pytorch-fid is not importable ({type(exc).__name__}: {exc}); pip install pytorch-fid")
    return inception


@contextlib.contextmanager
def _hub_checkpoint(weights: Path, file_name: str):
    """A temporary torch.hub folder whose checkpoints/<file_name> is the user's weights file."""
    import torch.hub

    previous = torch.hub.get_dir()
    with tempfile.TemporaryDirectory(prefix="cnrt-fid-hub-") as tmp:
        target = Path(tmp) / "checkpoints" / file_name
        target.parent.mkdir()
        try:
            target.symlink_to(weights.resolve())
        except OSError:
            shutil.copyfile(weights, target)
        torch.hub.set_dir(tmp)
        try:
            yield
        finally:
            torch.hub.set_dir(previous)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def load_pd_scorer(weights: "Path | None", device: str) -> "PDScorer | PDUnavailable":
    """The scorer, or why PD cannot be computed. A weights file that pytorch-fid rejects is a user error."""
    if weights is None:
        return PDUnavailable(f"no --inception-weights FILE given (pytorch-fid's FID weights, {FID_WEIGHTS_FILE})")
    inception = _import_pytorch_fid()
    if isinstance(inception, PDUnavailable):
        return inception
    weights = Path(weights)
    file_name = Path(urlparse(inception.FID_WEIGHTS_URL).path).name
    try:
        with _hub_checkpoint(weights, file_name):
            model = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[FID_FEATURE_DIM]],
                                          use_fid_inception=True)
    except Exception as exc:  # torch.load / load_state_dict raise many types for a wrong file
        raise ControlNetRTError(f"cannot load --inception-weights {weights} into pytorch-fid's FID InceptionV3 "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}): "
                                f"pass {file_name}") from exc
    notes = []
    # The official file's name carries the first 8 hex digits of its sha256.
    expected = file_name.rsplit("-", 1)[-1].split(".")[0]
    actual = _sha256(weights)
    if not actual.startswith(expected):
        notes.append(f"--inception-weights sha256 {actual[:8]}... is not the official FID weights ({expected}...): "
                     "PD values are not comparable with the hackathon's")
    return PDScorer(model=model.to(device).eval(), device=device, notes=notes)
