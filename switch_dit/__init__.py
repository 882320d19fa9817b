"""switch-dit: Switch Diffusion Transformer (ECCV 2024) with the DiT and DTR baselines and the token-routed
TC-MoE and EC-MoE on one backbone.

    import switch_dit
    model = switch_dit.load("fashion-mnist")                 # or a checkpoint, an export, a model folder
    pipe = switch_dit.Pipeline.from_pretrained("fashion-mnist")
    images = pipe(class_labels=["Sneaker", 3])
    summary = switch_dit.train(switch_dit.Config(model="Switch-DiT-XS/4", data="digits", image_size=8))
"""
from .config import PRESETS, Config
from .diffusion import GaussianDiffusion, create_diffusion, create_weighting
from .loading import load, save_pretrained
from .models import DiT, ModelOutput, create_model, model_names
from .pipeline import Pipeline
from .train import train  # the function; the module stays importable as switch_dit.train via `from ... import`

__version__ = "0.1.0"
__all__ = ["create_model", "ModelOutput", "DiT", "model_names", "create_diffusion", "GaussianDiffusion",
           "create_weighting", "load", "save_pretrained", "Pipeline", "train", "Config", "PRESETS", "__version__"]
