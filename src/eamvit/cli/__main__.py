import sys

from eamvit.cli.main import main

sys.exit(main())
