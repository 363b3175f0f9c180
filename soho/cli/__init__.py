"""Command-line entry points, one module per console script (``soho-pretrain`` is ``soho.cli.pretrain:main``).

tools/ and data_scripts/ in a checkout run the same functions as scripts, for ``accelerate launch``.
"""
