"""Our weights in the layout ``transformers.FlavaForPreTraining.save_pretrained`` writes, for the Hugging Face export.

``flava.model.hf`` maps parameter names; this adds what a transformers checkpoint holds beyond them: transformers'
three tower poolers take no part in FLAVA pretraining and have no counterpart in our model, so they are written with
transformers' own initialisation (normal(0, ``initializer_range``) weights, zero biases, from a fixed seed) and
loading reports no missing weight. ``flava.export`` packages the result with a processor and a model card.
"""
from __future__ import annotations

import torch

from flava.model import hf

# Seed of the poolers' initialisation (see the module docstring): fixed so that exports are reproducible.
_POOLER_SEED = 0
_POOLERS = ("flava.image_model.pooler.dense", "flava.text_model.pooler.dense", "flava.multimodal_model.pooler.dense")
_HEADS = ("mim_head", "mlm_head", "mmm_image_head", "mmm_text_head")


def transformers_state(model, hf_config) -> dict[str, torch.Tensor]:
    """Our weights under transformers' names, exactly the tensors ``FlavaForPreTraining.save_pretrained`` writes:
    tied ``*_head.bias`` aliases dropped (``*_head.decoder.bias`` kept), the unused poolers initialised.
    Checked key by key (and shape by shape) against transformers' model built on the meta device."""
    # transformers is in the ``pipeline`` extra: flava.model itself imports without it (pyproject.toml).
    from transformers import FlavaForPreTraining

    state = hf.to_transformers_state_dict(model)
    for head in _HEADS:
        alias = state.pop(f"{head}.bias", None)
        if alias is not None and not torch.equal(alias, state[f"{head}.decoder.bias"]):
            raise ValueError(f"{head}.bias differs from {head}.decoder.bias; transformers ties them")
    state.update(_pooler_init(hf_config))

    with torch.device("meta"):
        reference = FlavaForPreTraining(hf_config).state_dict()
    expected = {k: v for k, v in reference.items() if not (k.endswith(".bias") and k.split(".")[0] in _HEADS
                                                             and k.count(".") == 1)}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        raise ValueError(
            f"converted weights do not fit transformers' FlavaForPreTraining: missing {missing[:8]}, unexpected "
            f"{unexpected[:8]}, wrong shape {wrong[:8]}"
        )
    return {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
            for k, v in state.items()}


def _pooler_init(hf_config) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(_POOLER_SEED)
    widths = {
        "flava.image_model.pooler.dense": hf_config.image_config.hidden_size,
        "flava.text_model.pooler.dense": hf_config.text_config.hidden_size,
        "flava.multimodal_model.pooler.dense": hf_config.multimodal_config.hidden_size,
    }
    out = {}
    for name in _POOLERS:
        width = widths[name]
        weight = torch.empty(width, width).normal_(0.0, hf_config.initializer_range, generator=generator)
        out[f"{name}.weight"], out[f"{name}.bias"] = weight, torch.zeros(width)
    return out


__all__ = ["transformers_state"]
