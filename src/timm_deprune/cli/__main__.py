"""``python -m timm_deprune.cli``: the ``timm-deprune`` command."""
from .app import main

raise SystemExit(main())
