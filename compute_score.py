"""Score the pipeline as the hackathon does: per-image latency of process() and fidelity to the fp32 reference.

    python3 compute_score.py                      # GPU: 20 images, default profile; CPU: tiny model, 4 images
    python3 compute_score.py --images /home/player/pictures_croped \
        --inception-weights pt_inception-2015-12-05-6726825d.pth

Writes out/score/report.json, the result images (bird_{i}.jpg, reference/bird_{i}.jpg) and grid.png. All logic
lives in scoring/; this file only turns the command line into a ScoreConfig.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", help="'synthetic', 'synthetic-tiny', a diffusers folder or an LDM checkpoint "
                        "(default: $CNRT_WEIGHTS, else 'synthetic' on GPU, 'synthetic-tiny' on CPU)")
    parser.add_argument("--profile", help="profile name (default: $CNRT_PROFILE, else 256x384-fp16 on GPU, "
                        "256x384-fp32 on CPU)")
    parser.add_argument("--backend", help="auto, torch, onnxruntime or tensorrt (default: $CNRT_BACKEND, else auto)")
    parser.add_argument("--device", help="cuda, cuda:N or cpu (default: $CNRT_DEVICE, else cuda when available)")
    parser.add_argument("--images", metavar="DIR", help="folder of input images, e.g. the hackathon's bird_0..19.jpg "
                        "(default: 20 pictures from scikit-image, made once under build/test_images)")
    parser.add_argument("--num-images", type=int, help="images to run (default: 20 on GPU, 4 on CPU)")
    parser.add_argument("--out", metavar="DIR", help="output folder (default: out/score)")
    parser.add_argument("--inception-weights", metavar="FILE", help="pytorch-fid's FID Inception weights "
                        "(pt_inception-2015-12-05-6726825d.pth) to compute the PD score")
    parser.add_argument("--no-reference", action="store_true", help="skip the fp32 reference (latency only)")
    parser.add_argument("--trace", metavar="FILE", help="write a torch.profiler chrome trace of one process() call")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from profiles.errors import ControlNetRTError
    from scoring import format_table, resolve_config, run_score

    try:
        config = resolve_config(weights=args.weights, profile=args.profile, backend=args.backend, device=args.device,
                                images=args.images, num_images=args.num_images, out=args.out,
                                inception_weights=args.inception_weights, reference=not args.no_reference,
                                trace=args.trace)
        for note in config.notes:
            print(f"note: {note}")
        report = run_score(config)
    except ControlNetRTError as exc:
        print(f"compute_score: error: {' '.join(str(exc).splitlines())}", file=sys.stderr)
        return 1
    print()
    print(format_table(report))
    print(f"\nreport, images and grid written to {config.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
