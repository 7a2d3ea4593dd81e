"""``python -m vitpipe.jobs.cli ...`` (the entrypoint of a submitted job)."""

from vitpipe.jobs.cli import main

main()
