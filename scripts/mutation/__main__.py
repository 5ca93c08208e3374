import sys

from scripts.mutation.cli import main

sys.exit(main())
