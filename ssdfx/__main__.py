import sys

from ssdfx.cli import main

sys.exit(main())
