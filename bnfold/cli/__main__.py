"""``python -m bnfold.cli``: the ``bnfold`` command."""

from __future__ import annotations

import sys

from bnfold.cli import main

sys.exit(main())
