import sys

from cached.ctl.cli import main

sys.exit(main())
