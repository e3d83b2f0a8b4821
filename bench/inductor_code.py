"""`python3 -m bench.inductor_code DIR [--out FILE]`: what Inductor generated for the compiled parts, in short.

Why: the ninth session's gains came from reading Inductor's generated code for kernels that need not exist: an
identity copy before a batched matmul, a group norm's apply split in three, split-K sums as strided persistent
reductions (bench/NOTES.md). The generated modules of the step are tens of MB, more than the device tool brings
back. This reads an Inductor cache directory (`TORCHINDUCTOR_CACHE_DIR`; `python3 -m bench.profile_step
--inductor-code FILE` points one at a fresh directory and runs this at the end) and writes, per generated module,
every launch of its `call` in order with the source nodes it fuses, and marks the Triton kernels that only move
data (no arithmetic, at most two loads): the first place to look for a copy to remove.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

_KERNEL_DEF = re.compile(r"^(\w+) = async_compile\.(?:triton|cpp_pybinding)\('?(\w*)", re.MULTILINE)
_SOURCE = re.compile(r"^\s*# Topologically Sorted Source Nodes: \[(.*?)\]", re.MULTILINE)
_LAUNCH = re.compile(r"^\s*(?:(\w+)\.run\(|(\w+)\((?!.*=)|(extern_kernels\.\w+)\(|(torch\.ops\.\w+\.\w+)[.(])")
# Computation in a kernel body: an operator between temporaries, or a math / reduction call (index arithmetic
# inside a load's address does not count; nor does a cast, `tmpN = tmpM.to(...)`).
_ARITHMETIC = re.compile(r"tmp\d+ = (?!tl\.load)[^\n]*\btmp\d+\b[^\n]* [-+*/] |libdevice|tl_math|tl\.sum|tl\.reduce|"
                         r"triton_helpers|tl\.where|tl\.exp|tl\.sigmoid|tl\.maximum|tl\.minimum|rsqrt")


@dataclass
class Launch:
    name: str
    sources: str  # the fused nodes' names, as Inductor lists them
    data_only: bool


def data_only(source: str) -> bool:
    """A Triton kernel that loads at most two tensors and stores without computing: a copy or a gather. (source:
    its async_compile text; only the function after its `def` line counts, not the imports and decorators.)"""
    m = re.search(r"^def \w+\(.*?\):\n", source, re.MULTILINE | re.DOTALL)
    body = source[m.end():].split("'''", 1)[0] if m else ""
    return ("tl.store" in body and len(re.findall(r"tl\.load\(", body)) <= 2
            and not _ARITHMETIC.search(body))


def kernel_bodies(code: str) -> dict[str, str]:
    """name -> source of every kernel the module defines with async_compile."""
    bodies = {}
    starts = list(_KERNEL_DEF.finditer(code))
    for m, nxt in zip(starts, starts[1:] + [None]):
        bodies[m.group(1)] = code[m.end():nxt.start() if nxt is not None else len(code)]
    return bodies


def launches(code: str) -> list[Launch]:
    """The launches of the module's `call`, in order, each with the source nodes of the comment above it."""
    start = re.search(r"^\s*def call\((?:self, )?args\):", code, re.MULTILINE)
    if start is None:
        return []
    bodies = kernel_bodies(code)
    found, sources = [], ""
    for line in code[start.end():].splitlines():
        if re.match(r"^\S", line) or re.match(r"^    def ", line):  # the end of call
            break
        m = _SOURCE.match(line)
        if m:
            sources = m.group(1)
            continue
        m = _LAUNCH.match(line)
        if not m:
            continue
        name = next(g for g in m.groups() if g)
        if not (name in bodies or name.startswith(("extern_kernels.", "torch.ops.")) or line.strip().startswith(
                name + ".run(")):
            continue  # an ordinary call (assert_size_stride, empty_strided, ...)
        found.append(Launch(name, sources, name in bodies and data_only(bodies[name])))
    return found


def summarise(directory: Path) -> str:
    lines = []
    modules = sorted(p for p in Path(directory).rglob("*.py")
                     if re.search(r"^\s*def call\((?:self, )?args\):", p.read_text(errors="replace"), re.MULTILINE))
    for path in modules:
        found = launches(path.read_text(errors="replace"))
        if not found:
            continue
        copies = sum(launch.data_only for launch in found)
        lines.append(f"== {path.relative_to(directory)}: {len(found)} launches, {copies} only move data")
        for i, launch in enumerate(found):
            mark = "  [data only]" if launch.data_only else ""
            lines.append(f"{i:4d}  {launch.name}{mark}")
            if launch.sources:
                lines.append(f"        <- {launch.sources[:200]}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("directory", type=Path, help="an Inductor cache directory (TORCHINDUCTOR_CACHE_DIR)")
    p.add_argument("--out", type=Path, help="write here instead of stdout")
    a = p.parse_args(argv)
    if not a.directory.is_dir():
        print(f"no such directory: {a.directory}", file=sys.stderr)
        return 2
    text = summarise(a.directory)
    if a.out:
        a.out.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
