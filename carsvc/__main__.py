import sys

from carsvc.cli import main

sys.exit(main())
