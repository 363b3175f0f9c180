"""Pre-train every variant of a sweep file with several seeds, evaluate zero-shot retrieval (and, with
--finetune, fine-tuned retrieval) and print one table of mean ± std over seeds:

    python tools/ablate.py --sweep configs/ablations/decoupling.yaml --out runs/ablations/decoupling \\
        --seeds 0 1 2 --max-eval-images 100
    # a CPU smoke run: extra arguments are pre-training overrides for every variant
    python tools/ablate.py --sweep configs/ablations/decoupling.yaml --out runs/ablations/smoke \\
        --seeds 0 1 train.max_steps=50

Each run writes to <out>/<variant>/seed_<seed>/; a run whose results.json exists is not run again, so the
same command resumes an interrupted sweep. Writes <out>/results.json, results.csv and table.md.

--variants runs a subset, so several processes (or machines sharing <out>) can split a sweep; a last call
without it tabulates everything. On 2 CPU cores, two single-threaded halves finish sooner than one sweep:

    OMP_NUM_THREADS=1 python tools/ablate.py --sweep S --out O --variants merged co_attention asymmetric_text &
    OMP_NUM_THREADS=1 python tools/ablate.py --sweep S --out O --variants modality_specific asymmetric_image \
        itm_contrastive; wait
    python tools/ablate.py --sweep S --out O
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from soho.config import ConfigError
from soho.train.ablation import load_ablation, run_ablation


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", required=True, help="sweep YAML, e.g. configs/ablations/decoupling.yaml")
    parser.add_argument("--out", required=True, help="directory of the runs and the table")
    parser.add_argument("--seeds", type=int, nargs="+", help="default: the sweep file's seeds")
    parser.add_argument("--protocols", nargs="+", choices=("itm_all", "itc", "itc_itm"),
                        help="retrieval protocols (default: the sweep file's, else itm_all)")
    parser.add_argument("--max-eval-images", type=int, help="gallery size: the first N images of the split")
    parser.add_argument("--finetune", action="store_true", help="also fine-tune each run for retrieval")
    parser.add_argument("--variants", nargs="+", help="run (and tabulate) only these variants of the sweep")
    parser.add_argument("overrides", nargs="*",
                        help="pre-training overrides for every variant, e.g. train.max_steps=50")
    args = parser.parse_args(argv)
    sweep_overrides = []
    if args.seeds:
        sweep_overrides.append(f"seeds={json.dumps(args.seeds)}")
    if args.protocols:
        sweep_overrides.append(f"evaluation.protocols={json.dumps(args.protocols)}")
    if args.max_eval_images is not None:
        sweep_overrides.append(f"evaluation.max_images={args.max_eval_images}")
    if args.finetune:
        sweep_overrides.append("finetune.enabled=true")
    try:
        ablation = load_ablation(args.sweep, sweep_overrides)
        ablation.common = [*ablation.common, *args.overrides]
        if args.variants:
            unknown = sorted(set(args.variants) - set(ablation.variants))
            if unknown:
                raise ConfigError(f"--variants: {', '.join(unknown)} not in {args.sweep} "
                                  f"(its variants: {', '.join(ablation.variants)})")
            ablation.variants = {name: ablation.variants[name] for name in args.variants}
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        result = run_ablation(ablation, args.out)
    except ConfigError as error:
        parser.error(str(error))
    print(result.table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
