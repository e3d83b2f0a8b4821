"""`python3 -m surgery --weights synthetic-tiny --profile 256x384-fp32 --out build/256x384-fp32/onnx`"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from profiles import ControlNetRTError, Precision, get_profile


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m surgery",
                                     description="Export the four ONNX files of one profile (cached: a rerun with "
                                                 "nothing changed is a no-op). Progress goes to stderr, the written "
                                                 "paths to stdout.")
    parser.add_argument("--weights", required=True,
                        help="'synthetic', 'synthetic-tiny', a diffusers folder or an LDM checkpoint")
    parser.add_argument("--profile", default="256x384-fp32", help="profile name (profiles/config.py)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default build/<profile>/onnx)")
    parser.add_argument("--precision", choices=[p.value for p in Precision], default=None,
                        help="override the profile's precision")
    parser.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript")
    parser.add_argument("--cache", type=Path, default=None, help="weights cache folder (default build/weights)")
    args = parser.parse_args(argv)
    try:
        from models import load_bundle
        from surgery.build import build_onnx
        from surgery.export import ExportOptions

        profile = get_profile(args.profile)
        out = args.out or Path("build") / profile.name / "onnx"
        bundle = load_bundle(args.weights, cache_root=args.cache)
        paths = build_onnx(bundle, profile, out, args.precision,
                           options=ExportOptions(dynamo=args.exporter == "dynamo"))
    except ControlNetRTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for network, path in paths.items():
        print(f"{network}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
