"""``python -m lightning_firecaffe.comm.schedules``: print the registered algorithms as a Markdown table."""

from . import markdown_table

print(markdown_table())
