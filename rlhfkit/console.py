"""The one rich console: messages and progress bars go to stderr, data to files/stdout.

Under a multi-process launcher only rank 0 talks (the others would repeat every line);
errors are printed by every process (see rlhfkit.config.run_stage).
"""

import os

from rich.console import Console

console = Console(stderr=True, quiet=os.environ.get("RANK", "0") != "0")
