"""Generate the synthetic shapes world: webdataset shards for every split, a tokenizer, a manifest.

    python data_scripts/make_synthetic.py --out data/synthetic
    python data_scripts/make_synthetic.py --out /tmp/tiny --scale 0.01 --workers 1
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from soho.config import ConfigError
from soho.data.synthetic import DEFAULT_SPLIT_SIZES, SyntheticWorldConfig, generate_world


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/synthetic", help="root directory (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every split size, e.g. 0.01 for a tiny test set (each split keeps >= 1 sample)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="default: %(default)s")
    args = parser.parse_args(argv)
    if args.scale <= 0:
        parser.error(f"--scale must be > 0, got {args.scale}")
    try:
        config = SyntheticWorldConfig(
            seed=args.seed, image_size=args.image_size, num_workers=args.workers,
            split_sizes={split: max(1, round(size * args.scale)) for split, size in DEFAULT_SPLIT_SIZES.items()})
    except ConfigError as error:
        parser.error(str(error))
    started = time.perf_counter()
    manifest = generate_world(config, args.out)
    seconds = time.perf_counter() - started
    out = Path(args.out)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{'split':<16}{'samples':>9}{'images':>9}{'shards':>8}")
    for split, entry in manifest["splits"].items():
        print(f"{split:<16}{entry['samples']:>9}{entry['images']:>9}{len(entry['shards']):>8}")
    print(f"wrote {out} ({size / 2 ** 20:.0f} MiB, tokenizer trained on {manifest['texts']} texts) "
          f"in {seconds:.1f} s with {manifest['num_workers']} worker(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
