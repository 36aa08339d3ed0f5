"""VCT kernel layer: the Visual Concept Translator's steps as pure torch functions.

Host-agnostic: imports torch and the standard library only. A model is a denoiser callable
`(x, sigma, cond, transformer_options) -> denoised` in ComfyUI's sigma parameterisation.
"""
from .appearance import ROLE_APPEARANCE, AppearanceConfig, AppearanceWindow
from .attention import (
    BORROW,
    BRANCHES_KEY,
    KEEP,
    MIX,
    ROLE_MAIN,
    ROLE_REF,
    ROLE_UNCOND,
    ROLES_KEY,
    AttentionController,
    AttentionPatch,
    InjectionConfig,
    apply_probs,
    attention_probs,
    refine_mapping,
    sdpa_attention,
    token_weights,
)
from .concept import (
    ConceptConfig,
    ConceptResult,
    concept_loss,
    init_concept_vectors,
    learn_concept,
    reference_latent_sampler,
)
from .conditioning import Cond, cond_cat, cond_detach, cond_leaves, cond_map
from .ddim import cfg, ddim_invert, ddim_invert_step, ddim_sample, ddim_step, guided_denoise, latent_to_x, x_to_latent
from .dual_branch import DualBranchResult, Guidance, dual_branch_sample
from .local_blend import BLEND_KEY, BlendConfig, MaskAccumulator, blend_step
from .null_text import NullTextResult, fixed_null_embeddings, null_text_invert
from .scaling import LossScale
from .schedule import (
    alphas_cumprod_to_sigmas,
    ddim_sigmas,
    ddim_timesteps,
    scaled_linear_alphas_cumprod,
    steps_in_window,
    window_sigma,
)

__all__ = [
    "ROLE_APPEARANCE",
    "AppearanceConfig",
    "AppearanceWindow",
    "ROLE_MAIN",
    "ROLE_REF",
    "ROLE_UNCOND",
    "KEEP",
    "BORROW",
    "MIX",
    "ROLES_KEY",
    "BRANCHES_KEY",
    "Guidance",
    "AttentionController",
    "AttentionPatch",
    "InjectionConfig",
    "apply_probs",
    "attention_probs",
    "refine_mapping",
    "sdpa_attention",
    "token_weights",
    "ConceptConfig",
    "ConceptResult",
    "concept_loss",
    "init_concept_vectors",
    "learn_concept",
    "reference_latent_sampler",
    "Cond",
    "cond_cat",
    "cond_detach",
    "cond_leaves",
    "cond_map",
    "cfg",
    "ddim_invert",
    "ddim_invert_step",
    "ddim_sample",
    "ddim_step",
    "guided_denoise",
    "latent_to_x",
    "x_to_latent",
    "DualBranchResult",
    "dual_branch_sample",
    "BLEND_KEY",
    "BlendConfig",
    "MaskAccumulator",
    "blend_step",
    "NullTextResult",
    "LossScale",
    "fixed_null_embeddings",
    "null_text_invert",
    "alphas_cumprod_to_sigmas",
    "ddim_sigmas",
    "ddim_timesteps",
    "scaled_linear_alphas_cumprod",
    "steps_in_window",
    "window_sigma",
]
