import sys

from gguflm.cli import main

sys.exit(main())
