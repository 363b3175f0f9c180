"""Fine-tune every task of a transfer study from each start (pre-trained checkpoints and, as the baseline, random
weights) with several seeds at equal budgets, and print a table of mean ± std over seeds and of the gains:

    python tools/transfer.py --study configs/transfer/synthetic.yaml --out runs/transfer/synthetic
    # one task, two seeds, shorter runs (extra arguments are overrides of every fine-tuning run)
    python tools/transfer.py --study configs/transfer/synthetic.yaml --out runs/transfer/smoke \\
        --tasks ve --seeds 0 1 train.max_steps=50

Each run writes to <out>/<task>/<start>/seed_<seed>/; a finished run is not run again, so the same command
resumes an interrupted study. Writes <out>/results.json and table.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from soho.config import ConfigError
from soho.train.transfer import load_transfer, run_transfer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", required=True, help="study YAML, e.g. configs/transfer/synthetic.yaml")
    parser.add_argument("--out", required=True, help="directory of the runs and the table")
    parser.add_argument("--seeds", type=int, nargs="+", help="default: the study file's seeds")
    parser.add_argument("--tasks", nargs="+", help="run only these tasks of the study (the table shows all finished)")
    parser.add_argument("overrides", nargs="*", help="overrides of every fine-tuning run, e.g. train.max_steps=50")
    args = parser.parse_args(argv)
    try:
        study = load_transfer(args.study, [f"seeds={json.dumps(args.seeds)}"] if args.seeds else [])
        study.common = [*study.common, *args.overrides]
        unknown = sorted(set(args.tasks or []) - set(study.tasks))
        if unknown:
            raise ConfigError(f"--tasks: {', '.join(unknown)} not in {args.study} "
                              f"(its tasks: {', '.join(study.tasks)})")
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        table = run_transfer(study, args.out, args.tasks)
    except ConfigError as error:
        parser.error(str(error))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
