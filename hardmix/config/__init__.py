"""Typed configuration for runs and sweeps: the schema, loading (presets, YAML, ``--set``),
pure validation rules and environment checks, each in its own module:

* :mod:`hardmix.config.schema` -- the dataclasses (fields, help, defaults, constraints) and
  :func:`from_dict`, a mapping made into them;
* :mod:`hardmix.config.rules` -- :func:`validate`: every field and the rules between fields;
* :mod:`hardmix.config.loading` -- presets with ``base`` inheritance, files, overrides;
* :mod:`hardmix.config.environment` -- what a config needs from the machine, checked once per
  entry point;
* :mod:`hardmix.config.acts` -- which field acts for a run.

Imports point one way (schema <- rules <- loading, environment); the registries the schema takes
its choices from (methods, data sets, models, optimisers, metrics) never import the config.

The names below are the public API (``from hardmix.config import load_config, RunConfig``).
"""

from hardmix.config.environment import (check_run_environment, check_sweep_environment,
                                        check_writable)
from hardmix.config.loading import (deep_merge, load_config, parse_overrides, preset_kind,
                                    preset_names, read_preset, read_yaml_file)
from hardmix.config.rules import (check_fields, check_k, topk_count, validate,
                                  with_overrides)
from hardmix.config.schema import (AugmentConfig, DataConfig, EvalConfig, FollowupConfig,
                                   ModelConfig, OptimConfig, OutputConfig, ParamSpec,
                                   ResourcesConfig, RunConfig, SchedulerConfig, SweepConfig,
                                   describe_fields, field_meta, field_type, flatten, from_dict,
                                   to_dict, to_yaml)
from hardmix.errors import ConfigError, HardmixError, fail

__all__ = [
    "AugmentConfig", "DataConfig", "EvalConfig", "FollowupConfig", "ModelConfig", "OptimConfig",
    "OutputConfig", "ParamSpec", "ResourcesConfig", "RunConfig", "SchedulerConfig", "SweepConfig",
    "ConfigError", "HardmixError", "fail", "load_config", "from_dict", "parse_overrides",
    "deep_merge", "preset_kind", "preset_names", "read_preset", "read_yaml_file", "validate",
    "check_fields", "check_k", "topk_count", "with_overrides", "check_run_environment",
    "check_sweep_environment", "check_writable", "describe_fields", "field_meta", "field_type",
    "flatten", "to_dict", "to_yaml",
]
