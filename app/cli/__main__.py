"""``python -m app.cli``: the ``autonomy`` command without its console script."""

from app.cli import main

main()
