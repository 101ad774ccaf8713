"""`python -m gateway.testing`: serve a fake Braze standalone, for benchmarks."""

import sys

from gateway.testing.braze import main

sys.exit(main())
