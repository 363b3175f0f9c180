"""Convert Flickr30k Entities to soho shards.

The ``soho-convert-flickr30k-entities`` command as a script (the code is in soho/cli/convert_flickr30k_entities.py).
"""
import sys

from soho.cli.convert_flickr30k_entities import main

if __name__ == "__main__":
    sys.exit(main())
