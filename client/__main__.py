"""`python -m client WORKFLOW [--url URL] [--set NODE.input=VALUE ...]`: see client/cli.py."""
import sys

from .cli import main

sys.exit(main())
