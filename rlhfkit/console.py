"""The one rich console: messages and progress bars go to stderr, data to files/stdout.

Under a multi-process launcher only rank 0 talks (the others would repeat every line);
errors are printed by every process (see rlhfkit.config.run_stage).

Written to a file or a pipe (CI, `tee`), lines are not wrapped at rich's default 80 columns:
a log line stays one line, whatever its length.

`quiet_libraries()` silences what the libraries rlhfkit drives print on their own (the
transformers LOAD REPORT when a head is initialised, weight-loading progress bars,
DeepSpeed's "Setting accelerator to CPU", peft/transformers warnings the stages already
handle); the CLI calls it before a stage's module is imported unless `--debug` is given.
"""

import logging
import os
import sys
import warnings

from rich.console import Console

console = Console(stderr=True, quiet=os.environ.get("RANK", "0") != "0")
console.soft_wrap = not console.is_terminal

# Libraries whose Python warnings a stage run hides: the stages check what these warn
# about themselves (lengths, missing heads, LoRA targets) and say it in their own words.
CHATTY_MODULES = r"(transformers|peft|torch|deepspeed|accelerate|huggingface_hub|tokenizers|datasets)(\.|$)"


class _ErrorsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def quiet_libraries() -> None:
    """Hide third-party logging, progress bars and warnings; errors still show.

    Environment variables are set (unless the user set them) before transformers and
    huggingface_hub are imported, which read them at import time; DeepSpeed makes its
    "DeepSpeed" logger at import with its own level, so a filter on that logger (which
    survives its set-up) drops everything below ERROR.
    """
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    deepspeed_logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _ErrorsOnly) for f in deepspeed_logger.filters):
        deepspeed_logger.addFilter(_ErrorsOnly())
    warnings.filterwarnings("ignore", module=CHATTY_MODULES)
    if "transformers" in sys.modules:  # imported already (e.g. by a program using the Python API)
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
