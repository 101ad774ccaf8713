"""`python -m gateway` is the `gateway` command."""

from .cli import main

raise SystemExit(main())
