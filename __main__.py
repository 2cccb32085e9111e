import sys

from fedleak.cli import main

sys.exit(main())
