"""VCT's joint-attention control (nodes/arch/joint.py, vct_ops/joint_attention.py) on tiny SD3 and Flux
models built from ComfyUI's classes: the override reaches every joint-attention call, B equals B*
exactly when the concept is the source, the control changes B otherwise, and the original model
is left alone."""
from __future__ import annotations

import importlib

import pytest
import torch
from support import comfy_tiny_flow as flow

STEPS = 6


@pytest.fixture(params=["sd3", "flux"], scope="module")
def family(request, comfy_session, vct_pack):
    if request.param == "sd3":
        model, clip = flow.tiny_sd3_model(), flow.tiny_sd3_clip()
    else:
        model, clip = flow.tiny_flux_model(), flow.tiny_flux_clip()

    def cond(text):
        context, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
        c = {"c_crossattn": context, "y": pooled}
        if request.param == "flux":
            c["guidance"] = torch.tensor([3.5])
        return c

    return dict(name=request.param, model=model, source=cond("a red circle"), concept=cond("a blue square"),
                null=cond(""))


def run(pack, family, concept, self_fraction=0.9, cross_fraction=0.2, calls=None):
    ops = pack.vct_ops
    joint = importlib.import_module(pack.arch.__name__ + ".joint")
    denoiser = importlib.import_module(pack.arch.__name__.rsplit(".", 1)[0] + ".model.denoiser")
    sampling = family["model"].model.model_sampling
    sigmas = ops.ddim_sigmas(sampling.sigmas, STEPS)
    z0 = torch.randn(1, flow.LATENT_CHANNELS, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = denoiser.Denoiser(family["model"])
    x_T = ops.ddim_invert(plain, z0, sigmas, family["source"], space=ops.FLOW)[-1]
    config = ops.InjectionConfig(self_fraction, cross_fraction)
    text = family["source"]["c_crossattn"].shape[1]
    same = concept is family["source"]
    config.mapper, config.alphas = ops.refine_mapping(list(range(text)), list(range(text)), text)
    if not same:  # two concept tokens of its own, re-weighted
        config.weights = ops.token_weights(text, [2, 3], 0.5)
    patched = joint.joint_controlled_clone(family["model"], ops.JointAttentionController(sigmas, config))
    if calls is not None:
        override = patched.model_options["transformer_options"]["optimized_attention_override"]

        def counting(func, *args, **kwargs):
            calls.append(tuple(args[0].shape))
            return override(func, *args, **kwargs)

        patched.model_options["transformer_options"]["optimized_attention_override"] = counting
    # Flux is guidance-distilled (its guidance is an input): one conditional pass per step, two rows.
    nulls = None if family["name"] == "flux" else [family["null"]] * STEPS
    with torch.no_grad():
        return ops.dual_branch_sample(denoiser.Denoiser(patched), x_T, sigmas, family["source"], concept, nulls, 3.0)


def test_concept_equal_to_source_gives_b_equal_to_b_star_exactly(pack, family):
    for fractions in ((0.9, 0.2), (1.0, 1.0)):
        result = run(pack, family, family["source"], *fractions)
        assert torch.equal(result.main, result.ref), fractions


def test_the_override_reaches_every_joint_attention_call(pack, family):
    calls = []
    run(pack, family, family["concept"], calls=calls)
    blocks = 2 if family["name"] == "sd3" else 4  # SD3: 2 joint blocks; Flux: 2 double + 2 single
    assert len(calls) == blocks * (STEPS - 1)  # the last step is the schedule's identity step
    rows = 4 if family["name"] == "sd3" else 2  # Flux: no unconditional rows
    assert all(shape[0] == rows for shape in calls)
    assert "optimized_attention_override" not in family["model"].model_options.get("transformer_options", {})


def test_the_control_changes_the_translation_and_leaves_the_reconstruction(pack, family):
    free = run(pack, family, family["concept"], 0.0, 0.0)
    held = run(pack, family, family["concept"], 1.0, 0.2)
    assert torch.equal(free.ref, held.ref)  # B* never reads B
    assert not torch.equal(free.main, held.main)


def test_the_pack_reads_the_flow_from_comfyuis_model_sampling(pack, family, tiny_model):
    identity = importlib.import_module(pack.arch.__name__.rsplit(".", 1)[0] + ".model.identity")
    assert identity.state_space(family["model"]) is pack.vct_ops.FLOW
    assert identity.prediction_type(family["model"]) == "flow"
    assert identity.state_space(tiny_model) is pack.vct_ops.DIFFUSION
    assert identity.prediction_type(tiny_model) == "eps"


def test_a_choice_of_blocks_controls_only_those(pack, family):
    joint = importlib.import_module(pack.arch.__name__ + ".joint")
    keys = joint.joint_block_keys(family["model"])
    assert keys == ([("double_block", 0), ("double_block", 1)] if family["name"] == "sd3" else
                    [("double_block", 0), ("double_block", 1), ("single_block", 0), ("single_block", 1)])
    controlled = []
    ops = pack.vct_ops

    class Recording(ops.JointAttentionController):
        def joint_attention(self, q, k, v, text, extra_options, attention=None):
            controlled.append(extra_options.get(joint.BLOCK_KEY))
            return super().joint_attention(q, k, v, text, extra_options, attention)

    sigmas = ops.ddim_sigmas(family["model"].model.model_sampling.sigmas, STEPS)
    patched = joint.joint_controlled_clone(family["model"], Recording(sigmas, ops.InjectionConfig()),
                                           blocks=[("double_block", 1)])
    denoiser = importlib.import_module(pack.arch.__name__.rsplit(".", 1)[0] + ".model.denoiser")
    x = torch.randn(1, flow.LATENT_CHANNELS, 8, 8)
    nulls = None if family["name"] == "flux" else [family["null"]] * STEPS
    with torch.no_grad():
        ops.dual_branch_sample(denoiser.Denoiser(patched), x, sigmas, family["source"], family["concept"], nulls, 3.0)
    assert controlled and set(controlled) == {("double_block", 1)}
    with pytest.raises(ValueError, match="no joint-attention block"):
        joint.joint_controlled_clone(family["model"], Recording(sigmas, ops.InjectionConfig()),
                                     blocks=[("double_block", 7)])
