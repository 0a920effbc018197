"""Alias of :mod:`tgvkv.bench.cli` (the ``tgvkv-bench`` command line moved into the bench
subpackage); ``from tgvkv.cli import main`` keeps working."""

from .bench.cli import build_parser, main

__all__ = ["build_parser", "main"]
