"""Fine-tune a soho checkpoint on a downstream task.

The ``soho-finetune`` command as a script (the code is in soho/cli/finetune.py).
"""
import sys

from soho.cli.finetune import main

if __name__ == "__main__":
    sys.exit(main())
