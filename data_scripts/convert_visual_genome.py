"""Convert Visual Genome to soho shards.

The ``soho-convert-visual-genome`` command as a script (the code is in soho/cli/convert_visual_genome.py).
"""
import sys

from soho.cli.convert_visual_genome import main

if __name__ == "__main__":
    sys.exit(main())
