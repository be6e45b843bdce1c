import sys

from lsoftmax.cli import main

sys.exit(main())
