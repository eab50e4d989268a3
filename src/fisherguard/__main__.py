import sys

from fisherguard.cli import main

sys.exit(main())
