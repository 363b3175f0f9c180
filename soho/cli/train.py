"""What ``soho-pretrain`` and ``soho-finetune`` share: load a run config, train it, print its results."""
from __future__ import annotations

import argparse
import json
import logging
from typing import Optional, Sequence

from soho.cli import report
from soho.errors import SohoError
from soho.tasks import load_run_config
from soho.train.trainer import json_safe, train


def run(parser: argparse.ArgumentParser, config: str, overrides: Sequence[str],
        default_task: Optional[str] = None) -> int:
    """Train the task ``config`` names. How a run can end early (a user error, exit code 2; divergence, 3; a stop
    signal after its checkpoint, 128 + the signal) is one line on stderr and the exit code, not a traceback."""
    try:
        run_config = load_run_config(config, overrides, default_task=default_task)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        results = train(run_config)
    except SohoError as error:
        return report(parser.prog, error)
    print(json.dumps(json_safe({"task": results["task"], "steps": results["steps"],
                                **{name: split["metrics"] for name, split in results["splits"].items()}}), indent=2))
    return 0
