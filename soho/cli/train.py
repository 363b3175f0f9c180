"""What ``soho-pretrain`` and ``soho-finetune`` share: load a run config, train it, print its results."""
from __future__ import annotations

import argparse
import json
import logging
from typing import Optional, Sequence

from soho.config import ConfigError
from soho.tasks import load_run_config
from soho.train.trainer import train


def run(parser: argparse.ArgumentParser, config: str, overrides: Sequence[str],
        default_task: Optional[str] = None) -> int:
    """Train the task ``config`` names; a user error (config, missing files found at set-up) is one line, exit 2."""
    try:
        run_config = load_run_config(config, overrides, default_task=default_task)
    except ConfigError as error:
        parser.error(str(error))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        results = train(run_config)
    except ConfigError as error:  # raised while setting up (tokenizer, checkpoint, vocabulary), before any step
        parser.error(str(error))
    print(json.dumps({"task": results["task"], "steps": results["steps"],
                      **{name: split["metrics"] for name, split in results["splits"].items()}}, indent=2))
    return 0
