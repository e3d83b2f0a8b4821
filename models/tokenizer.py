"""The CLIP BPE tokenizer, built offline.

FrozenCLIPEmbedder uses `CLIPTokenizer.from_pretrained("openai/clip-vit-large-patch14")`. That vocabulary is the
OpenAI BPE file `bpe_simple_vocab_16e6.txt.gz`, which open-clip-torch ships inside its wheel. We read it by path
(importing open_clip would pull torchvision) and build the same vocab/merges for transformers' CLIPTokenizer:
ids 0..255 bytes, 256..511 bytes+'</w>', then one id per merge, then <|startoftext|>=49406, <|endoftext|>=49407.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import os
import tempfile
from pathlib import Path

from profiles.errors import ControlNetRTError

MAX_LENGTH = 77
BOS_ID = 49406
EOS_ID = 49407
_VOCAB_ENV = "CNRT_CLIP_BPE"
_NUM_MERGES = 49152 - 256 - 2


def find_bpe_vocabulary() -> Path:
    override = os.environ.get(_VOCAB_ENV)
    if override:
        path = Path(override)
    else:
        spec = importlib.util.find_spec("open_clip")  # locates the package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise ControlNetRTError(
                "CLIP vocabulary not found: `pip install --no-deps open-clip-torch` (it ships "
                f"bpe_simple_vocab_16e6.txt.gz) or set {_VOCAB_ENV}=/path/to/bpe_simple_vocab_16e6.txt.gz")
        path = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise ControlNetRTError(f"CLIP vocabulary file {path} is missing: reinstall open-clip-torch")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def vocab_and_merges(bpe_path: Path) -> tuple[dict[str, int], list[str]]:
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = lines[1 : _NUM_MERGES + 1]
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


@functools.lru_cache(maxsize=1)
def load_tokenizer():
    """transformers' CLIPTokenizer with openai/clip-vit-large-patch14's vocabulary and special tokens."""
    from transformers import CLIPTokenizer

    vocab, merges = vocab_and_merges(find_bpe_vocabulary())
    # vocab.json + merges.txt in a folder is the one constructor that transformers 4.x and 5.x both accept.
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        Path(folder, "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        tok = CLIPTokenizer.from_pretrained(folder, model_max_length=MAX_LENGTH, pad_token="<|endoftext|>")
    if tok.convert_tokens_to_ids("<|startoftext|>") != BOS_ID or tok.pad_token_id != EOS_ID:
        raise ControlNetRTError("CLIP vocabulary file does not give the expected special-token ids")
    return tok


def tokenize(prompts: list[str]):
    """FrozenCLIPEmbedder's call: truncation, max_length 77, padding to max_length -> (N, 77) int64."""
    tok = load_tokenizer()
    batch = tok(prompts, truncation=True, max_length=MAX_LENGTH, padding="max_length", return_tensors="pt")
    return batch["input_ids"]
