"""Deprecated alias of :mod:`tgvkv.testing` (the random-weight model zoo moved out of the library's
Hugging Face layer); ``from tgvkv.hf import tiny`` keeps working."""

from ..testing import *  # noqa: F401,F403
from ..testing import __all__  # noqa: F401
