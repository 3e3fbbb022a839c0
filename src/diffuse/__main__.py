import sys

from diffuse.cli import main

sys.exit(main())
