"""The pipeline's typed config (``PipelineConfig``: one section per component, each section owned by that
component), named recipes (Python functions returning a whole config), ``build_config`` (recipe + dotted
overrides + absolute paths) and ``ResolvedConfig`` (a run's config serialised and redacted once)."""

from vitpipe.jobs.config.pipeline import ALL_STAGES, DataConfig, PipelineConfig, TrackingConfig, resolve_paths
from vitpipe.jobs.config.recipes import RECIPES, build_config, get_recipe, recipe
from vitpipe.jobs.config.resolved import ResolvedConfig

__all__ = ["ALL_STAGES", "DataConfig", "PipelineConfig", "RECIPES", "ResolvedConfig", "TrackingConfig",
           "build_config", "get_recipe", "recipe", "resolve_paths"]
