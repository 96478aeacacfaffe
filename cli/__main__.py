import sys

from vaultflow.cli import main

sys.exit(main())
