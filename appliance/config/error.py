"""`ConfigError`: the one exception for a config that cannot be used, raised by every stage of loading."""

from __future__ import annotations


class ConfigError(Exception):
    """A config that cannot be used. `source` names the file, `key_path` the key (e.g. `models[1].name`)."""

    def __init__(self, source: str, key_path: str, problem: str):
        super().__init__(": ".join(part for part in (source, key_path, problem) if part))
        self.source, self.key_path, self.problem = source, key_path, problem
