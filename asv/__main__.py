"""`python -m asv ...`: the command line (asv/cli.py). The package itself never exits; this entry point turns
the status that cli.main returns (1 after printing `error: ...`) into the process's exit code."""

from asv.cli import main

raise SystemExit(main())
