"""`python -m papertrain ...` is the same as the `papertrain` console script."""

from papertrain.cli import main

raise SystemExit(main())
