from .dit import MODEL_SIZES, DiT, DiTBlock, ModelOutput, create_model, model_names, parse_model_name
from .prior import DiffusionPrior, js_divergence, match_columns, prior_table
from .routing import ROUTERS, DTRRouter, SwitchRouter, dtr_table

__all__ = ["MODEL_SIZES", "DiT", "DiTBlock", "ModelOutput", "create_model", "model_names", "parse_model_name",
           "DiffusionPrior", "js_divergence", "match_columns", "prior_table", "ROUTERS", "DTRRouter",
           "SwitchRouter", "dtr_table"]
