"""The appliance's YAML configuration: the schema (`schema`), reading a file (`load`), the checks beyond the schema
(`check`) and walking the schema (`introspect`). Users import from here; `kvbox check-config` needs no torch.
"""

from appliance.config.error import ConfigError
from appliance.config.load import load_config, parse_config
from appliance.config.schema import (ENGINE_KEYS, MODEL_NAME_PATTERN, AppConfig, CorsSpec, KVCacheSpec,
                                     LoraAdapterSpec, LoraSpec, MetricsSpec, ModelSpec, ParallelismSpec,
                                     SamplingDefaults, SchedulerSpec, ServerSpec, UiSpec)

__all__ = ["ENGINE_KEYS", "MODEL_NAME_PATTERN", "AppConfig", "ConfigError", "CorsSpec", "KVCacheSpec",
           "LoraAdapterSpec", "LoraSpec", "MetricsSpec", "ModelSpec", "ParallelismSpec", "SamplingDefaults",
           "SchedulerSpec", "ServerSpec", "UiSpec", "load_config", "parse_config"]
