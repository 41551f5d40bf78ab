"""`ConfigError`: the one exception for a config that cannot be used, raised by every stage of loading."""

from __future__ import annotations


class ConfigError(Exception):
    """A config that cannot be used. `source` names the file, `key_path` the key (e.g. `models[1].name`)."""

    def __init__(self, source: str, key_path: str, problem: str):
        super().__init__(": ".join(part for part in (source, key_path, problem) if part))
        self.source, self.key_path, self.problem = source, key_path, problem


class ConfigErrors(ConfigError):
    """Several problems of one file, found in one run (one line each), so that fixing a config takes one pass."""

    def __init__(self, errors: list[ConfigError]):
        first = errors[0]
        super().__init__(first.source, first.key_path, first.problem)
        self.args = ("\n".join(str(e) for e in errors),)
        self.errors = errors
