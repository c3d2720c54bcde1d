"""The one rich console: messages and progress bars go to stderr, data to files/stdout."""

from rich.console import Console

console = Console(stderr=True)
