import sys

from pytest_duquant.cli import main

sys.exit(main())
