"""``python -m rsd.gpu_bench``: see ``rsd.gpu_bench.cli``."""

from rsd.gpu_bench.cli import main

raise SystemExit(main())
