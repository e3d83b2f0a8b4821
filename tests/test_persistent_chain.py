"""bench.persistent_chain's kernel: the chain it times is the chain of GEMMs, in every form it launches.

CPU, through Triton's interpreter: one launch per GEMM, and the persistent form with a single program (the
interpreter runs programs one after another, so a grid barrier over several would never open; with one program the
barrier's last-arrival path runs every phase). Both must give the same bytes, and match torch's chain.
"""

from __future__ import annotations

from tests.triton_interpreter import run_interpreted

CHAIN_CHECK = r"""
import torch
from bench.persistent_chain import run_chain
m, n, phases = 40, 64, 3
torch.manual_seed(0)
w = (torch.randn(phases * n, n) / n ** 0.5).half()
outs = []
for mode in ("launches", "persistent"):
    x = torch.zeros((phases + 1) * m, n, dtype=torch.half)
    x[:m] = torch.randn(m, n, generator=torch.Generator().manual_seed(1)).half()
    sync = torch.zeros(1, dtype=torch.int32)
    run_chain(x, w, sync, m, n, n, phases, (32, 32, 4, 2), mode, sms=1)
    outs.append(x[phases * m:].clone())
    barriers = phases - 1 if mode == "persistent" else 0
    assert int(sync.item()) == barriers << 16, (mode, sync)  # one generation a barrier, no arrival left over
h = torch.randn(m, n, generator=torch.Generator().manual_seed(1)).half().float()
for p in range(phases):
    h = (h @ w[p * n:(p + 1) * n].float().t()).half().float()
print(int(torch.equal(outs[0], outs[1])), (outs[0].float() - h).abs().max().item())
"""


def test_chain_forms_agree_interpreted():
    same, err = run_interpreted(CHAIN_CHECK, [], timeout=600).strip().splitlines()[-1].split()
    assert same == "1"  # the persistent form computes what the launches compute
    assert float(err) < 2e-2
