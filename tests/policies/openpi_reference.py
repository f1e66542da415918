"""Manual check: our pi0.5 against openpi's own PyTorch code on shared random (dummy) weights.

Not collected by pytest (needs openpi's source and transformers==4.53.2 patched with openpi's
`transformers_replace/`). Setup used during development (CPU, no network after install):

    python -m venv --system-site-packages /tmp/refenv
    /tmp/refenv/bin/pip install -c constraints.txt transformers==4.53.2
    cp -r <openpi>/src/openpi/models_pytorch/transformers_replace/* \
          /tmp/refenv/lib/python3.11/site-packages/transformers/
    # a stub `openpi` package with the three real files models_pytorch/{pi0_pytorch,gemma_pytorch,
    # preprocessing_pytorch}.py, `models/gemma.py` reduced to get_config, `shared/image_tools.py` stub
    PYTHONPATH=/tmp/openpi_stub:. /tmp/refenv/bin/python tests/policies/openpi_reference.py CKPT_DIR

openpi's PaliGemmaWithExpertModel hard-codes the So400m vision tower and a 2048-wide projector, so for the
dummy variant its vision tower and projector are replaced by the same HF/openpi classes built with the dummy
vision sizes; everything else (Gemma layers, adaRMS, masks, KV cache, Euler loop) is openpi's code.
Prints the max |difference| of sample_actions (normalized actions) in float32 and bfloat16.
"""

from __future__ import annotations

import sys
import types

import torch


def build_openpi(config, state_dict, precision):
    import transformers.utils.import_utils as iu

    iu._torchvision_available = False  # a broken torchvision must not be imported by transformers
    from openpi.models_pytorch.pi0_pytorch import PI0Pytorch
    from transformers import SiglipVisionConfig
    from transformers.models.paligemma.modeling_paligemma import PaliGemmaMultiModalProjector
    from transformers.models.siglip.modeling_siglip import SiglipVisionModel

    cfg = types.SimpleNamespace(
        pi05=True,
        paligemma_variant=config.paligemma_variant,
        action_expert_variant=config.action_expert_variant,
        dtype="float32",
        action_dim=config.action_dim,
        action_horizon=config.action_horizon,
        pytorch_compile_mode=None,
    )
    model = PI0Pytorch(cfg)
    pwe = model.paligemma_with_expert
    if config.variant != "pi05":
        v = config.vision
        vcfg = SiglipVisionConfig(
            hidden_size=v.width,
            num_hidden_layers=v.depth,
            num_attention_heads=v.num_heads,
            intermediate_size=v.mlp_dim,
            patch_size=v.patch_size,
            image_size=v.image_size,
            hidden_act="gelu_pytorch_tanh",
            layer_norm_eps=1e-6,
        )
        vcfg.vision_use_head = False
        pwe.paligemma.model.vision_tower = SiglipVisionModel(vcfg)
        pcfg = types.SimpleNamespace(
            vision_config=types.SimpleNamespace(hidden_size=v.width, projection_dim=config.vlm.width)
        )
        pwe.paligemma.model.multi_modal_projector = PaliGemmaMultiModalProjector(pcfg)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    allowed = {
        "paligemma_with_expert.paligemma.lm_head.weight",
        "paligemma_with_expert.gemma_expert.lm_head.weight",
    }
    assert set(missing) <= allowed and not unexpected, (missing, unexpected)
    pwe.to_bfloat16_for_selected_params(precision)
    return model.eval()


def main(ckpt_dir: str) -> int:
    from pytest_duquant.policies import load_policy, synthetic_observations

    obs = synthetic_observations(2, seed=5)
    worst = 0.0
    for precision, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        ours = load_policy(ckpt_dir, dtype=dtype)
        sd = {k: v.float() for k, v in ours.model.state_dict().items()}
        ref = build_openpi(ours.config, sd, precision)
        inp = ours.prepare(obs)
        noise = ours.noise([1, 2])
        keys = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
        observation = types.SimpleNamespace(
            images={k: inp["images"][:, i] for i, k in enumerate(keys)},
            image_masks={k: inp["image_masks"][:, i] for i, k in enumerate(keys)},
            state=torch.zeros(2, 32),
            tokenized_prompt=inp["tokens"],
            tokenized_prompt_mask=inp["token_masks"],
            token_ar_mask=None,
            token_loss_mask=None,
        )
        with torch.no_grad():
            a_ref = ref.sample_actions("cpu", observation, noise=noise.clone())
            a_ours = ours.model.sample_actions(noise=noise.clone(), **inp)
        diff = (a_ref.float() - a_ours.float()).abs().max().item()
        scale = a_ref.float().abs().max().item()
        print(f"{precision}: max |openpi - ours| = {diff:.3e} (max |action| {scale:.3f})")
        worst = max(worst, diff / max(scale, 1e-6))
    return 0 if worst < 1e-2 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
