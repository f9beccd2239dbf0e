"""python -m tokenflow.ui: the same as the tokenflow-ui command."""

from .app import main

main()
