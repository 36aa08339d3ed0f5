"""Content-concept fusion: the dual-branch sampler.

B* (reconstruction: source prompt) and B (translation: concept prompt) start from the same
inverted noise and share the per-step null embeddings as their unconditional input. Each step
sends all four rows through the model in one call, tagged with their roles, so attention
control can let B borrow B*'s maps inside that same call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .appearance import ROLE_APPEARANCE
from .attention import BRANCHES_KEY, ROLE_MAIN, ROLE_REF, ROLE_UNCOND, ROLES_KEY
from .conditioning import Cond, cond_cat, match_batch
from .ddim import Denoiser, StepCallback, cfg, ddim_step, sigma_batch
from .local_blend import BLEND_KEY, BlendConfig, MaskAccumulator, blend_step
from .schedule import steps_in_window
from .validate import check_latent, check_sigmas

# How B's guided estimate is formed from its rows: (x, sigma, cond denoised, uncond denoised,
# guidance scale, step index) -> denoised. The host passes one that runs its CFG hooks.
Guidance = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float, int], torch.Tensor]


@dataclass
class DualBranchResult:
    """Final states of the translation branch B (`main`) and of the reconstruction branch B* (`ref`)."""

    main: torch.Tensor
    ref: torch.Tensor
    # Local blend's last mask `[rows, 1, H, W]` (1 where B kept its own latent); None when the blend
    # was off or no cross-attention layer gave maps.
    blend_mask: Optional[torch.Tensor] = None


def dual_branch_sample(
    denoise: Denoiser,
    x_T: torch.Tensor,
    sigmas: torch.Tensor,
    source_cond: Cond,
    concept_cond: Cond,
    null_embeddings: Optional[list[Cond]],
    guidance: float = 7.5,
    transformer_options: Optional[dict] = None,
    callback: Optional[StepCallback] = None,
    ref_trajectory: Optional[torch.Tensor] = None,
    preview: Optional[StepCallback] = None,
    guide_main: Optional[Guidance] = None,
    appearance_trajectory: Optional[torch.Tensor] = None,
    appearance_cond: Optional[Cond] = None,
    local_blend: Optional[BlendConfig] = None,
) -> DualBranchResult:
    """Return B and B* after sampling both from `x_T` with CFG, one four-row model call per step.

    Rows are `[uncond B, uncond B*, cond B*, cond B]` (B's unconditional rows first, where host
    patches that look at "the" unconditional rows find them); `transformer_options` (e.g.
    attention patches) is passed through with the row roles and branches, the current sigma and
    the schedule added. `guide_main` replaces plain CFG for B (B* keeps plain CFG: it must retrace
    the source its null embeddings were tuned for).
    With `ref_trajectory` (the inversion trajectory, clean first), B* is put back on it after
    every step: Direct Inversion (Ju et al., ICLR 2024), an exact B* with no optimisation.
    `preview` receives B's guided clean-latent estimate after every model call.
    With `appearance_trajectory` (a reference image's inversion trajectory, clean first, under its
    own conditioning `appearance_cond`), one more row group R rides along, tagged "appearance":
    at every step R sits on that trajectory at the same step, so attention control can let B read
    its keys and values; R's prediction is not used. Without it, nothing changes.
    With an enabled `local_blend`, the attention patches add B's maps at its concept tokens into
    an accumulator (transformer option BLEND_KEY), and after every step from the blend's start B
    takes B*'s latent outside the mask they give (prompt-to-prompt's LocalBlend).
    With `null_embeddings` None (a guidance-distilled model such as Flux, which takes its guidance
    as an input and runs one conditional pass per step) there are no unconditional rows: each call
    holds `[cond B*, cond B]` (and R), and `guidance` and `guide_main` are not used.
    """
    check_latent("x_T", x_T)
    check_sigmas("sigmas", sigmas)
    steps = sigmas.numel() - 1
    distilled = null_embeddings is None
    if not distilled and len(null_embeddings) != steps:
        raise ValueError(
            f"null_embeddings holds {len(null_embeddings)} per-step embeddings but the schedule has {steps} "
            "steps; run the content inversion with the same number of steps"
        )
    if ref_trajectory is not None and tuple(ref_trajectory.shape) != (steps + 1, *x_T.shape):
        raise ValueError(
            f"ref_trajectory has shape {tuple(ref_trajectory.shape)} but a {steps}-step run from x_T needs "
            f"{(steps + 1, *x_T.shape)}; use the trajectory of the same inversion"
        )
    if (appearance_trajectory is None) != (appearance_cond is None):
        raise ValueError("give the reference's trajectory and its conditioning together, or neither")
    if appearance_trajectory is not None and tuple(appearance_trajectory.shape) != (steps + 1, *x_T.shape):
        raise ValueError(
            f"the reference's trajectory has shape {tuple(appearance_trajectory.shape)} but a {steps}-step run "
            f"from x_T needs {(steps + 1, *x_T.shape)}; invert a reference image of the source's size with the "
            "same number of steps"
        )
    rows = x_T.shape[0]
    source_cond = match_batch(source_cond, rows)
    concept_cond = match_batch(concept_cond, rows)
    if distilled:
        roles, branches, groups = [ROLE_REF] * rows + [ROLE_MAIN] * rows, [ROLE_REF] * rows + [ROLE_MAIN] * rows, 2
    else:
        roles = [ROLE_UNCOND] * (2 * rows) + [ROLE_REF] * rows + [ROLE_MAIN] * rows
        branches = [ROLE_MAIN] * rows + [ROLE_REF] * (2 * rows) + [ROLE_MAIN] * rows
        groups = 4
    if appearance_trajectory is not None:
        appearance_cond = match_batch(appearance_cond, rows)
        roles, branches, groups = roles + [ROLE_APPEARANCE] * rows, branches + [ROLE_APPEARANCE] * rows, groups + 1
    base_options = dict(transformer_options or {})
    masks, blend_from, mask = None, steps + 1, None
    if local_blend is not None and local_blend.enabled:
        masks = MaskAccumulator(local_blend, x_T.shape)
        base_options[BLEND_KEY] = masks
        blend_from = steps_in_window(sigmas, local_blend.start_fraction)
    x_ref, x_main = x_T, x_T
    with torch.no_grad():
        for i in range(steps):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            if sigma_next != sigma:
                sig = sigma_batch(sigma, groups * rows, x_T)
                options = dict(base_options, sigmas=sig, sample_sigmas=sigmas)
                options[ROLES_KEY] = roles
                options[BRANCHES_KEY] = branches
                xs, conds = [x_ref, x_main], [source_cond, concept_cond]
                if not distilled:
                    phi = match_batch(null_embeddings[i], rows)
                    xs, conds = [x_main, x_ref] + xs, [phi, phi] + conds
                if appearance_trajectory is not None:
                    # R on its own trajectory at this step, like B* under direct inversion.
                    xs.append(appearance_trajectory[steps - i].to(x_main))
                    conds.append(appearance_cond)
                den = denoise(torch.cat(xs), sig, cond_cat(conds), options)
                chunks = den.chunk(groups)
                if distilled:
                    den_ref, den_main = chunks[0], chunks[1]
                else:
                    u_main, u_ref, c_ref, c_main = chunks[:4]
                    if guide_main is None:
                        den_main = cfg(u_main, c_main, guidance)
                    else:
                        den_main = guide_main(x_main, sig[:rows], c_main, u_main, guidance, i)
                    den_ref = cfg(u_ref, c_ref, guidance)
                x_ref = ddim_step(x_ref, sigma, sigma_next, den_ref)
                x_main = ddim_step(x_main, sigma, sigma_next, den_main)
                if preview is not None:
                    preview(i + 1, steps, den_main)
            if ref_trajectory is not None:
                # Adding (target - x_ref) lands B* on the trajectory exactly; B keeps its own path.
                x_ref = ref_trajectory[steps - i - 1].to(x_ref)
            if masks is not None and i >= blend_from:
                mask = masks.mask()
                x_main = blend_step(x_main, x_ref, mask)
            if callback is not None:
                callback(i + 1, steps, x_main)
    return DualBranchResult(main=x_main, ref=x_ref, blend_mask=mask)
