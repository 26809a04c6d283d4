"""``python -m dvmmd.cli``: dvmmctl (the same as the ``dvmmctl`` script)."""

import sys

from dvmmd.cli.dvmmctl import main

sys.exit(main())
