import sys

from flava.cli import main

sys.exit(main())
