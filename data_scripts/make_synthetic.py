"""Generate the synthetic shapes world as webdataset shards (plus tokenizer and manifest).

    python data_scripts/make_synthetic.py --out data/synthetic
    python data_scripts/make_synthetic.py --out /tmp/tiny --scale 0.01
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from soho.data.synthetic import SyntheticWorldConfig, generate_world  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/synthetic")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every split size (tiny test sets)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    defaults = SyntheticWorldConfig()
    config = SyntheticWorldConfig(
        seed=args.seed, image_size=args.image_size, num_workers=args.workers,
        split_sizes={k: max(1, round(v * args.scale)) for k, v in defaults.split_sizes.items()})
    manifest = generate_world(config, args.out)
    summary = {split: {k: v for k, v in entry.items() if k != "shards"} for split, entry in manifest["splits"].items()}
    print(json.dumps({"out": args.out, "seconds": manifest["seconds"], "splits": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
