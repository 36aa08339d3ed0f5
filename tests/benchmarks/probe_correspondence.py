"""Does the toy model's decoder self-attention match the source's object to the reference's object (content) or to
the same positions? For the first 6 tasks, at steps 10, 25 and 40 of the reference's and the source's DDIM
inversions, the mass the source object's queries put on the reference object's keys and on the keys at the source
object's own positions, against chance (their share of the keys), per decoder level.

    COMFYUI_PATH=/path/to/ComfyUI python tests/benchmarks/probe_correspondence.py
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for folder in ("tests/quality", "tests/host", "."):
    sys.path.insert(0, str(ROOT / folder))
from support import comfy_env  # noqa: E402

comfy_env.ensure_bootstrapped()
import harness  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import toy_model  # noqa: E402
import world  # noqa: E402

import vct_ops  # noqa: E402

model, clip, _ = toy_model.load_trained(toy_model.weights_path())
unet = model.model
empty = toy_model.encode_text(clip, "")
sigmas = vct_ops.ddim_sigmas(model.get_model_object("model_sampling").sigmas.float(), 50)
stats = {}


def denoise(x, sigma, cond, options=None):
    return unet.apply_model(x, sigma, c_crossattn=cond, transformer_options=options or {})


def pool(mask, side):
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    return (torch.nn.functional.adaptive_avg_pool2d(m, side)[0, 0] >= 0.5).flatten()


for task in harness.task_set()[:6]:
    src_mask, ref_mask = world.true_mask(task.source), world.true_mask(task.reference)
    xs = []
    for scene in (task.source, task.reference):
        z0 = unet.process_latent_in(toy_model.image_to_latent(world.render(scene)))
        with torch.no_grad():
            xs.append(vct_ops.ddim_invert(denoise, vct_ops.latent_to_x(z0, sigmas[-1]), sigmas, empty))
    for step in (10, 25, 40):
        def patch(q, k, v, extra, src_mask=src_mask, ref_mask=ref_mask):
            n = q.shape[1]
            side = int(round(n ** 0.5))
            if extra["block"][0] == "output" and n >= 64:
                p = vct_ops.attention_probs(q[:1], k[1:2], extra["n_heads"]).mean(1)[0]  # src queries, ref keys
                s_m, r_m = pool(src_mask, side), pool(ref_mask, side)
                if s_m.any() and r_m.any():
                    on_ref_obj = float(p[s_m][:, r_m].sum(-1).mean())
                    on_same_pos = float(p[s_m][:, s_m].sum(-1).mean())
                    d = stats.setdefault(side, [])
                    d.append((on_ref_obj, float(r_m.float().mean()), on_same_pos, float(s_m.float().mean())))
            return vct_ops.sdpa_attention(q, k, v, extra["n_heads"])

        x = torch.cat([xs[0][50 - step], xs[1][50 - step]])
        sig = sigmas[step].repeat(2)
        keys = [("output", i, 0) for i in range(12)]
        opts = {"patches_replace": {"attn1": {kk: patch for kk in keys}}}
        with torch.no_grad():
            unet.apply_model(x, sig, c_crossattn=empty.repeat(2, 1, 1), transformer_options=opts)

for side, rows in sorted(stats.items()):
    a = np.array(rows)
    print(f"{side}x{side} decoder layers ({len(rows)} layer-steps): source-object queries put {a[:, 0].mean():.3f} of "
          f"their mass on the reference's object (its share of the keys {a[:, 1].mean():.3f}, lift "
          f"{a[:, 0].mean() / a[:, 1].mean():.2f}x), {a[:, 2].mean():.3f} on the source object's own positions "
          f"(share {a[:, 3].mean():.3f}, lift {a[:, 2].mean() / a[:, 3].mean():.2f}x)")
