"""Benchmarks (scripts, not tests): `python3 -m bench` times ours against diffusers baselines on one GPU."""
