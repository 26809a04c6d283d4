"""``python -m dvmmd.daemon``: the node daemon (the same as the ``dvmmd`` script)."""

import sys

from dvmmd.daemon.node_daemon import main

sys.exit(main())
