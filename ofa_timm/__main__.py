"""``python -m ofa_timm`` is ``ofa-timm``."""
import sys

from .cli import main

sys.exit(main())
