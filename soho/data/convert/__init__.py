"""Converters from real datasets' published files to soho's shard schema (docs/DATA.md).

``writer`` does what every converter shares (checked and resized images, resumable parallel
shard writing, the manifest); one module per dataset turns its files into a ``Conversion``.
"""
from soho.data.convert.writer import Conversion, ImageRef, Problem, Sample, TarMember, WriteOptions, convert, safe_key

__all__ = ["Conversion", "ImageRef", "Problem", "Sample", "TarMember", "WriteOptions", "convert", "safe_key"]
