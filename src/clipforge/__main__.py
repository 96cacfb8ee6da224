"""`python -m clipforge` is the `clipforge` command."""

import sys

from .cli import main

sys.exit(main())
