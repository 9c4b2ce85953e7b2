import sys

from .classify import main

sys.exit(main())
