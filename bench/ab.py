"""`python3 -m bench.ab "CNRT_X=0" "CNRT_X=1" ...`: profile_step once per environment setting, one table.

Why: a change is kept only if the loop gets faster on the same machine (H200s of one kind differ by up to 1 ms a
loop, bench/NOTES.md), so every A/B runs its variants back to back in one device call. This runs
`python3 -m bench.profile_step` in a fresh process per variant (the switches are read at import and change the
traced graph), removes the saved compiled kernels first so no variant loads another's, and prints each variant's
loop, step parts and kernel-time lines, then the loops side by side.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

from engines.torch_fast.compile import JIT_CACHE as JIT_CACHE_FILE

KEEP = re.compile(r"^(loop|latent|decode|part |kernel time|  \S.*kernels$)")
TORCH_ARTIFACTS = Path("build/256x384-fp16/torch")  # profile_step's default profile; one directory per GPU


def parse_setting(text: str) -> dict:
    """'A=1 B=2' -> {'A': '1', 'B': '2'}; '' (the defaults) -> {}."""
    env = {}
    for item in text.split():
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"expected NAME=VALUE, got {item!r}")
        env[name] = value
    return env


def loop_ms(output: str) -> "float | None":
    m = re.search(r"^loop \([^)]*\): ([\d.]+) ms", output, re.MULTILINE)
    return float(m.group(1)) if m else None


def variant_timeout(index: int, timeout: int, first_extra: int) -> int:
    """Seconds variant `index` may run: the first gets first_extra more, because on a fresh machine it also compiles
    every Triton kernel cold (in the fourteenth session a 175 s default variant timed out that way while the later
    ones finished, and the A/B lost its baseline; in the twenty-fourth, 210 s and 260 s first variants did too, so
    the default is now 200 + 120 s)."""
    return timeout + (first_extra if index == 0 else 0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("settings", nargs="+", help="one quoted 'NAME=VALUE ...' per variant; '' runs the defaults")
    p.add_argument("--timeout", type=int, default=200, help="seconds per variant")
    p.add_argument("--first-extra", type=int, default=120,
                   help="seconds more for the first variant, which compiles the Triton kernels cold")
    a = p.parse_args(argv)
    variants = [(s, parse_setting(s)) for s in a.settings]
    loops = []
    for index, (text, env) in enumerate(variants):
        timeout = variant_timeout(index, a.timeout, a.first_extra)
        for cache in TORCH_ARTIFACTS.glob(f"*/{JIT_CACHE_FILE}"):  # every variant compiles afresh
            cache.unlink()
        print(f"== {text or '(defaults)'}", flush=True)
        try:
            done = subprocess.run([sys.executable, "-m", "bench.profile_step"], env={**os.environ, **env},
                                  capture_output=True, text=True, timeout=timeout)
            output, status = done.stdout + done.stderr, f"rc {done.returncode}"
        except subprocess.TimeoutExpired as e:
            output = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            status = f"timed out after {timeout} s"
        print(status)
        lines = output.splitlines()
        for line in lines:
            if KEEP.match(line):
                print(line)
        if status != "rc 0":  # say why: the end of what it printed
            print("\n".join("  | " + line for line in lines[-12:]))
        loops.append(loop_ms(output))
    print("\nloop ms: " + ", ".join(f"{text or '(defaults)'}: {'-' if ms is None else f'{ms:.2f}'}"
                                    for (text, _), ms in zip(variants, loops)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
