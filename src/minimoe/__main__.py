import sys

from minimoe.cli.main import main

sys.exit(main())
