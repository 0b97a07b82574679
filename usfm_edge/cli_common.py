"""What every ``usfm-edge`` command module shares: click's context settings and a progress bar on stderr."""

from __future__ import annotations

import sys

import click

CONTEXT = dict(help_option_names=["-h", "--help"], max_content_width=110)


def progress(it, label):
    """click's progress bar on stderr, as a plain iterator wrapper."""
    with click.progressbar(it, label=label, file=sys.stderr) as bar:
        yield from bar
