"""switch-dit: Switch Diffusion Transformer (ECCV 2024) with the DiT and DTR baselines on one backbone."""
from .diffusion import GaussianDiffusion, create_diffusion, create_weighting
from .models import DiT, ModelOutput, create_model, model_names

__version__ = "0.1.0"
__all__ = ["create_model", "ModelOutput", "DiT", "model_names", "create_diffusion", "GaussianDiffusion",
           "create_weighting", "__version__"]
