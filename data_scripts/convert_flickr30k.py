"""Convert Flickr30k captions in Karpathy's splits to soho shards.

The ``soho-convert-flickr30k`` command as a script (the code is in soho/cli/convert_flickr30k.py).
"""
import sys

from soho.cli.convert_flickr30k import main

if __name__ == "__main__":
    sys.exit(main())
