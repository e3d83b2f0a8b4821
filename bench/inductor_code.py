"""`python3 -m bench.inductor_code DIR [--out FILE]`: what Inductor generated for the compiled parts, in short.

Why: the ninth session's gains came from reading Inductor's generated code for kernels that need not exist: an
identity copy before a batched matmul, a group norm's apply split in three, split-K sums as strided persistent
reductions (bench/NOTES.md). The generated modules of the step are tens of MB, more than the device tool brings
back. This reads an Inductor cache directory (`TORCHINDUCTOR_CACHE_DIR`; `python3 -m bench.profile_step
--inductor-code FILE` points one at a fresh directory and runs this at the end) and writes, per generated module,
every launch of its `call` in order with the source nodes it fuses, and marks the Triton kernels that only move
data (no arithmetic, at most two loads): the first place to look for a copy to remove.

`--sequence FILE` (a profiled loop from `bench.profile_step --sequence-out`) joins one step's Inductor kernels with
the bytes Inductor estimated for each (`kernel_num_gb`, which it records when it compiles with
TORCHINDUCTOR_BENCHMARK_KERNEL=1; `profile_step --inductor-code` sets it) and lists them by how far their time on
the step's critical path exceeds those bytes at `--bandwidth`: the kernels whose cost is not their traffic (index
arithmetic, too few programs, a bad split), as the twentieth session found for the group norms' statistics.
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


def kernel_bytes(code: str) -> dict[str, float]:
    """name -> bytes Inductor estimated for each kernel of a generated module that records them (kernel_num_gb;
    an estimate of 0, which Inductor gives where it could not size a buffer, is left out)."""
    found = {}
    for m in re.finditer(r"'kernel_name': '(\w+)'[^\n]*?'kernel_num_gb': ([0-9.eE+-]+)", code):
        if float(m.group(2)) > 0:
            found[m.group(1)] = float(m.group(2)) * 1e9
    return found


@dataclass
class Kernel:
    """One line of a profiled sequence: start and duration (us), idle gap before it, name."""

    start: float
    duration: float
    name: str


def read_sequence(text: str) -> list[Kernel]:
    rows = []
    for line in text.splitlines():
        parts = line.split(None, 3)
        if len(parts) == 4:
            rows.append(Kernel(float(parts[0]), float(parts[1]), parts[3].strip()))
    return rows


def split_steps(rows: list[Kernel], steps: int) -> list[list[Kernel]]:
    """The loop's kernels cut into its steps, at each launch of the first kernel that is not a copy or a memset."""
    marker = next(r.name for r in rows if not r.name.startswith(("Memcpy", "Memset")))
    starts = [i for i, r in enumerate(rows) if r.name == marker]
    if len(starts) != steps:
        raise ValueError(f"{marker!r} starts {len(starts)} stretches of the sequence, not {steps} steps")
    return [rows[a:b] for a, b in zip(starts, starts[1:] + [len(rows)])]


def critical_path(step: list[Kernel]) -> list[float]:
    """Each kernel's share of the step's critical path: its end minus the latest end before it (PDL launches a
    kernel early, so its own duration overlaps the kernel before it)."""
    latest, shares = step[0].start if step else 0.0, []
    for k in step:
        end = k.start + k.duration
        shares.append(max(0.0, end - latest))
        latest = max(latest, end)
    return shares


def excess_table(step: list[Kernel], modules: list[dict[str, float]], bandwidth: float, top: int) -> str:
    """The step's Inductor kernels by critical-path time above their bytes at `bandwidth` (bytes / s). A kernel
    name defined by several modules is taken from the module the step is in (the last one matched)."""
    rows, current = [], None
    for index, (k, share) in enumerate(zip(step, critical_path(step))):
        if not k.name.startswith("triton_"):
            continue
        if current is None or k.name not in current:
            current = next((m for m in modules if k.name in m), current)
        nbytes = current.get(k.name) if current is not None else None
        floor = nbytes / bandwidth * 1e6 if nbytes is not None else None
        rows.append((index, share, k.duration, nbytes, floor, k.name))
    known = [r for r in rows if r[3] is not None]
    lines = [f"{len(rows)} Inductor kernels a step, {sum(r[1] for r in rows):.0f} us on the critical path; "
             f"{len(known)} with bytes: {sum(r[1] for r in known):.0f} us against {sum(r[4] for r in known):.0f} us "
             f"at {bandwidth / 1e12:.1f} TB/s",
             f"{'#':>4s} {'path us':>8s} {'kernel us':>9s} {'MB':>7s} {'floor us':>8s} {'excess':>7s}  name"]
    for index, share, duration, nbytes, floor, name in sorted(known, key=lambda r: r[4] - r[1])[:top]:
        lines.append(f"{index:4d} {share:8.1f} {duration:9.1f} {nbytes / 1e6:7.2f} {floor:8.1f} {share - floor:7.1f}  "
                     f"{name}")
    return "\n".join(lines) + "\n"


def sequence_table(directory: Path, sequence: str, steps: int, step: int = 1, bandwidth: float = 2.5e12,
                   top: int = 40) -> str:
    """`excess_table` for step `step` of a profiled loop of `steps` steps (the text profile_step --sequence-out
    writes) against the kernels' bytes in the generated modules under `directory`."""
    modules = [m for m in (kernel_bytes(path.read_text(errors="replace")) for path in sorted(directory.rglob("*.py")))
               if m]
    return excess_table(split_steps(read_sequence(sequence), steps)[step], modules, bandwidth, top)


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
    p.add_argument("--sequence", type=Path, help="instead: join this profiled loop (profile_step --sequence-out) "
                   "with the kernels' bytes")
    p.add_argument("--steps", type=int, default=20, help="steps in the profiled loop")
    p.add_argument("--step", type=int, default=1, help="which step to read (0-based)")
    p.add_argument("--bandwidth", type=float, default=2.5e12, help="bytes / s a kernel's floor assumes")
    p.add_argument("--top", type=int, default=40)
    a = p.parse_args(argv)
    if not a.directory.is_dir():
        print(f"no such directory: {a.directory}", file=sys.stderr)
        return 2
    if a.sequence:
        text = sequence_table(a.directory, a.sequence.read_text(), a.steps, a.step, a.bandwidth, a.top)
    else:
        text = summarise(a.directory)
    if a.out:
        a.out.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
