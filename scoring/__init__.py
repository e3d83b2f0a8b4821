"""The score harness behind compute_score.py: latency through the hackathon interface, fidelity against fp32.

Modules, one job each: config (CLI values + environment -> ScoreConfig), images (test images), metrics (PSNR,
errors, latency summaries), pd (the hackathon's Inception-feature distance), grid (the comparison sheet),
report (JSON + text table), environment (device description), trace (profiler trace), harness (the run).
"""

from scoring.config import ProcessArgs, ScoreConfig, resolve_config
from scoring.harness import run_score
from scoring.report import ScoreReport, format_table

__all__ = ["ProcessArgs", "ScoreConfig", "ScoreReport", "format_table", "resolve_config", "run_score"]
