"""Conversion to and from transformers' ``FlavaForPreTraining`` / ``FlavaConfig``.

Weights map key by key except that transformers keeps separate ``query``/``key``/``value`` projections where we
keep one fused ``qkv`` (concatenated along the output dimension, in that order), and that each masked-prediction
head's ``*_head.bias`` is tied to ``*_head.decoder.bias`` there (a checkpoint may hold either or both).
transformers' three tower poolers (``flava.{image,text,multimodal}_model.pooler``) take no part in pretraining;
they are dropped on import and left at transformers' initialisation on export -- the only tensors a round trip
hf -> ours -> hf does not carry. ours -> hf -> ours is lossless. The DALL-E codebook, when present, maps to
``image_codebook.*``.

transformers is imported lazily (only the functions that build transformers objects need it).
``load_transformers_checkpoint(local_dir)`` reads a downloaded checkpoint (e.g. ``facebook/flava-full``) from
disk -- safetensors only, never a pickle, never the network.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from flava.model.codebook import DalleCodebook
from flava.model.config import FlavaConfig
from flava.model.pretraining import FlavaForPretraining

log = logging.getLogger(__name__)

_ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}
_ACT_FROM_HF = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "relu": "relu"}
_HEADS = ("mim_head", "mlm_head", "mmm_image_head", "mmm_text_head")
_TOWERS = {  # ours -> transformers prefix of the transformer stack
    "image_encoder.encoder": "flava.image_model",
    "text_encoder.encoder": "flava.text_model",
    "multimodal_encoder.encoder": "flava.multimodal_model",
}
_BLOCK = {  # inside one block: ours -> transformers
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "attn.proj": "attention.output.dense",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
_QKV = ("query", "key", "value")
# Tensors transformers has and we do not use (its tower poolers).
HF_ONLY_PREFIXES = ("flava.image_model.pooler.", "flava.text_model.pooler.", "flava.multimodal_model.pooler.")


def _one_to_one(cfg: FlavaConfig) -> dict[str, str]:
    """ours -> transformers names of every tensor that maps 1:1 (all but the fused qkv and the head biases)."""
    names = {
        "logit_scale": "flava.logit_scale",
        "image_projection": "flava.image_projection",
        "text_projection": "flava.text_projection",
        "multimodal_encoder.image_input": "flava.image_to_mm_projection",
        "multimodal_encoder.text_input": "flava.text_to_mm_projection",
        "image_encoder.cls_token": "flava.image_model.embeddings.cls_token",
        "image_encoder.mask_token": "flava.image_model.embeddings.mask_token",
        "image_encoder.position_embeddings": "flava.image_model.embeddings.position_embeddings",
        "image_encoder.patch_embed": "flava.image_model.embeddings.patch_embeddings.projection",
        "text_encoder.word_embeddings": "flava.text_model.embeddings.word_embeddings",
        "text_encoder.position_embeddings": "flava.text_model.embeddings.position_embeddings",
        "text_encoder.token_type_embeddings": "flava.text_model.embeddings.token_type_embeddings",
        "text_encoder.embed_norm": "flava.text_model.embeddings.LayerNorm",
        "multimodal_encoder.cls_token": "flava.multimodal_model.cls_token",
        "itm_head.pooler": "itm_head.pooler.dense",
        "itm_head.classifier": "itm_head.seq_relationship",
    }
    for head in _HEADS:
        names[f"{head}.transform.dense"] = f"{head}.transform.dense"
        names[f"{head}.transform.norm"] = f"{head}.transform.LayerNorm"
        names[f"{head}.decoder.weight"] = f"{head}.decoder.weight"
    layers = {"image_encoder.encoder": cfg.image.num_layers, "text_encoder.encoder": cfg.text.num_layers,
              "multimodal_encoder.encoder": cfg.multimodal.num_layers}
    for ours, hf in _TOWERS.items():
        names[f"{ours}.norm"] = f"{hf}.layernorm"
        for i in range(layers[ours]):
            for a, b in _BLOCK.items():
                names[f"{ours}.blocks.{i}.{a}"] = f"{hf}.encoder.layer.{i}.{b}"
    return names


def _expand(names: dict[str, str], keys: set[str]) -> dict[str, str]:
    """Module-level names -> tensor names (``.weight`` / ``.bias``) present in ``keys`` (our state dict)."""
    out = {}
    for ours, hf in names.items():
        if ours in keys:
            out[ours] = hf
            continue
        for suffix in (".weight", ".bias"):
            if ours + suffix in keys:
                out[ours + suffix] = hf + suffix
    return out


def _qkv_keys(cfg: FlavaConfig, keys: set[str]) -> dict[str, list[str]]:
    """ours fused qkv tensor -> [query, key, value] transformers tensors."""
    out = {}
    layers = {"image_encoder.encoder": cfg.image.num_layers, "text_encoder.encoder": cfg.text.num_layers,
              "multimodal_encoder.encoder": cfg.multimodal.num_layers}
    for ours, hf in _TOWERS.items():
        for i in range(layers[ours]):
            for suffix in ("weight", "bias"):
                key = f"{ours}.blocks.{i}.attn.qkv.{suffix}"
                if key in keys:
                    out[key] = [f"{hf}.encoder.layer.{i}.attention.attention.{p}.{suffix}" for p in _QKV]
    return out


def _our_keys(cfg: FlavaConfig) -> set[str]:
    with torch.device("meta"):
        return set(FlavaForPretraining(cfg).state_dict())


def to_transformers_state_dict(model_or_state: FlavaForPretraining | dict[str, torch.Tensor],
                               cfg: FlavaConfig | None = None) -> dict[str, torch.Tensor]:
    """Our state dict -> transformers ``FlavaForPreTraining`` names (without the unused tower poolers; with
    ``image_codebook.*`` when a model holding a ``DalleCodebook`` is given)."""
    codebook = None
    if isinstance(model_or_state, FlavaForPretraining):
        cfg, state, codebook = model_or_state.config, model_or_state.state_dict(), model_or_state.codebook
    else:
        state = model_or_state
        if cfg is None:
            raise ValueError("to_transformers_state_dict needs cfg when given a bare state dict")
    check_transformers_compatible(cfg)
    keys = set(state)
    out: dict[str, torch.Tensor] = {}
    for ours, hf in _expand(_one_to_one(cfg), keys).items():
        out[hf] = state[ours].detach().clone()
    for ours, (q, k, v) in _qkv_keys(cfg, keys).items():
        out[q], out[k], out[v] = (t.clone() for t in state[ours].detach().chunk(3, dim=0))
    for head in _HEADS:
        bias = state[f"{head}.decoder.bias"].detach()
        out[f"{head}.decoder.bias"] = bias.clone()
        out[f"{head}.bias"] = bias.clone()
    if isinstance(codebook, DalleCodebook):
        out.update({f"image_codebook.{k}": v.detach().clone() for k, v in codebook.state_dict().items()})
    missing = _our_keys(cfg) - keys
    if missing:
        raise ValueError(f"state dict lacks {sorted(missing)[:8]}")
    return out


def from_transformers_state_dict(
    hf_state: dict[str, torch.Tensor], cfg: FlavaConfig, *, allow_missing_heads: bool = False
) -> dict[str, torch.Tensor]:
    """transformers ``FlavaForPreTraining`` state dict -> ours. Accepts ``*_head.bias`` and/or
    ``*_head.decoder.bias``; ignores the tower poolers and ``image_codebook.*``. With ``allow_missing_heads``
    a checkpoint without pretraining heads (a bare ``FlavaModel``, prefix ``flava.`` added if absent) converts,
    leaving those heads out of the result."""
    if not any(k.startswith("flava.") for k in hf_state):  # a FlavaModel checkpoint: add the prefix
        hf_state = {f"flava.{k}": v for k, v in hf_state.items()}
    check_transformers_compatible(cfg)
    keys = _our_keys(cfg)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []

    def take(name: str) -> torch.Tensor | None:
        if name not in hf_state:
            missing.append(name)
            return None
        used.add(name)
        return hf_state[name]

    for ours, hf in _expand(_one_to_one(cfg), keys).items():
        tensor = take(hf)
        if tensor is not None:
            out[ours] = tensor.detach().clone()
    for ours, parts in _qkv_keys(cfg, keys).items():
        tensors = [take(p) for p in parts]
        if all(t is not None for t in tensors):
            out[ours] = torch.cat([t.detach() for t in tensors], dim=0)
    for head in _HEADS:
        candidates = [hf_state[n] for n in (f"{head}.decoder.bias", f"{head}.bias") if n in hf_state]
        used.update(n for n in (f"{head}.decoder.bias", f"{head}.bias") if n in hf_state)
        if not candidates:
            missing.append(f"{head}.bias")
            continue
        if len(candidates) == 2 and not torch.equal(candidates[0], candidates[1]):
            raise ValueError(f"{head}.bias and {head}.decoder.bias differ; they must be tied")
        out[f"{head}.decoder.bias"] = candidates[0].detach().clone()

    head_prefixes = _HEADS + ("itm_head",)
    hard_missing = [m for m in missing if not (allow_missing_heads and m.startswith(head_prefixes))]
    if hard_missing:
        raise ValueError(f"transformers state dict lacks {hard_missing[:8]} ({len(hard_missing)} in all)")
    leftover = sorted(
        k for k in set(hf_state) - used
        if not k.startswith(HF_ONLY_PREFIXES + ("image_codebook.",))
        and not k.endswith(("position_ids", "token_type_ids"))
    )
    if leftover:
        raise ValueError(f"transformers state dict has tensors with no place in our model: {leftover[:8]}")
    return out


def check_transformers_compatible(cfg: FlavaConfig) -> None:
    """transformers builds MMM heads from the image/text configs but applies them to multimodal states, so it
    needs equal widths; and it always fuses the pre-LayerNorm states."""
    widths = {"image.hidden_size": cfg.image.hidden_size, "text.hidden_size": cfg.text.hidden_size,
              "multimodal.hidden_size": cfg.multimodal.hidden_size}
    if len(set(widths.values())) != 1:
        raise ValueError(f"transformers' FLAVA needs equal tower widths, got {widths}")
    if cfg.multimodal.fusion_input != "pre_norm":
        raise ValueError("transformers' FLAVA fuses pre-norm states: multimodal.fusion_input must be 'pre_norm'")
    if cfg.image.stem != "patch":
        raise ValueError(f"transformers' FLAVA embeds patches with one strided convolution: image.stem must be "
                         f"'patch', got {cfg.image.stem!r}")


def _tower_to_hf(t) -> dict[str, Any]:
    return dict(
        hidden_size=t.hidden_size, num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
        intermediate_size=t.intermediate_size, hidden_act=_ACT_TO_HF[t.hidden_act],
        hidden_dropout_prob=t.dropout, attention_probs_dropout_prob=t.attention_dropout,
        layer_norm_eps=t.layer_norm_eps, qkv_bias=t.qkv_bias,
    )


def to_transformers_config(cfg: FlavaConfig, codebook: DalleCodebook | None = None):
    """Our ``FlavaConfig`` -> ``transformers.FlavaConfig``."""
    import transformers  # optional extra (pyproject "pipeline"), ~0.6 s to import: only these functions need it

    check_transformers_compatible(cfg)
    image = dict(_tower_to_hf(cfg.image), image_size=cfg.image.image_size, patch_size=cfg.image.patch_size,
                 num_channels=cfg.image.num_channels, vocab_size=cfg.codebook_size, mask_token=True,
                 initializer_range=cfg.initializer_range)
    text = dict(_tower_to_hf(cfg.text), vocab_size=cfg.text.vocab_size, type_vocab_size=cfg.text.type_vocab_size,
                max_position_embeddings=cfg.text.max_position_embeddings, pad_token_id=cfg.text.pad_token_id,
                initializer_range=cfg.initializer_range)
    multimodal = dict(_tower_to_hf(cfg.multimodal), use_cls_token=True, initializer_range=cfg.initializer_range)
    extra: dict[str, Any] = {"init_codebook": codebook is not None}
    if codebook is not None:
        extra["image_codebook_config"] = dict(codebook.config)
    loss = cfg.loss
    return transformers.FlavaConfig(
        image_config=image, text_config=text, multimodal_config=multimodal,
        hidden_size=cfg.multimodal.hidden_size, layer_norm_eps=cfg.multimodal.layer_norm_eps,
        projection_dim=cfg.projection_dim, logit_scale_init_value=cfg.logit_scale_init,
        initializer_range=cfg.initializer_range,
        mim_weight=loss.mim, mlm_weight=loss.mlm, global_contrastive_weight=loss.contrastive, itm_weight=loss.itm,
        mmm_image_weight=loss.mmm_image, mmm_text_weight=loss.mmm_text, **extra,
    )


def _tower_from_hf(t: dict[str, Any]) -> dict[str, Any]:
    act = t.get("hidden_act", "gelu")
    if act not in _ACT_FROM_HF:
        raise ValueError(f"hidden_act {act!r} of transformers' config has no counterpart here")
    return dict(
        hidden_size=t["hidden_size"], num_layers=t["num_hidden_layers"], num_heads=t["num_attention_heads"],
        intermediate_size=t["intermediate_size"], hidden_act=_ACT_FROM_HF[act],
        dropout=t.get("hidden_dropout_prob", 0.0), attention_dropout=t.get("attention_probs_dropout_prob", 0.0),
        layer_norm_eps=t.get("layer_norm_eps", 1e-12), qkv_bias=t.get("qkv_bias", True),
    )


def from_transformers_config(hf_config: Any, attention: str = "sdpa") -> FlavaConfig:
    """``transformers.FlavaConfig`` (or its ``to_dict()``) -> our ``FlavaConfig``."""
    raw = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
    image, text, mm = raw["image_config"], raw["text_config"], raw["multimodal_config"]
    if isinstance(image.get("image_size"), (list, tuple)) or isinstance(image.get("patch_size"), (list, tuple)):
        raise ValueError("only square image_size / patch_size convert")
    if not mm.get("use_cls_token", True):
        raise ValueError("multimodal_config.use_cls_token=False has no counterpart here")
    tree = {
        "image": dict(_tower_from_hf(image), image_size=image["image_size"], patch_size=image["patch_size"],
                      num_channels=image.get("num_channels", 3)),
        "text": dict(_tower_from_hf(text), vocab_size=text["vocab_size"],
                     max_position_embeddings=text["max_position_embeddings"],
                     type_vocab_size=text.get("type_vocab_size", 2), pad_token_id=text.get("pad_token_id") or 0),
        "multimodal": dict(_tower_from_hf(mm), fusion_input="pre_norm"),
        "loss": {"mim": raw.get("mim_weight", 1.0), "mlm": raw.get("mlm_weight", 1.0),
                 "mmm_image": raw.get("mmm_image_weight", 1.0), "mmm_text": raw.get("mmm_text_weight", 1.0),
                 "itm": raw.get("itm_weight", 1.0), "contrastive": raw.get("global_contrastive_weight", 1.0)},
        "projection_dim": raw.get("projection_dim", 768),
        "logit_scale_init": raw.get("logit_scale_init_value", 2.6592),
        "codebook_size": image.get("vocab_size", 8192),
        "initializer_range": raw.get("initializer_range", 0.02),
        "attention": attention,
    }
    return FlavaConfig.model_validate(tree)


def _codebook_from_hf_state(hf_state: dict[str, torch.Tensor], codebook_config: dict[str, Any] | None):
    state = {k.removeprefix("image_codebook."): v for k, v in hf_state.items() if k.startswith("image_codebook.")}
    if not state:
        return None
    fields = {k: v for k, v in (codebook_config or {}).items() if k in
              ("num_groups", "input_channels", "num_blocks_per_group", "hidden_size", "vocab_size")}
    codebook = DalleCodebook(**fields)
    codebook.load_state_dict(state)
    return codebook


def from_transformers(hf_model: Any, *, attention: str = "sdpa") -> FlavaForPretraining:
    """A transformers ``FlavaForPreTraining`` -> our model (with its DALL-E codebook, if it holds one)."""
    cfg = from_transformers_config(hf_model.config, attention=attention)
    hf_state = hf_model.state_dict()
    raw = hf_model.config.to_dict()
    codebook = _codebook_from_hf_state(hf_state, raw.get("image_codebook_config"))
    if codebook is not None and codebook.num_codes != cfg.codebook_size:
        codebook = None  # an unrelated default codebook; MIM targets must then come from elsewhere
    model = FlavaForPretraining(cfg, codebook=codebook)
    model.load_state_dict(from_transformers_state_dict(hf_state, cfg))
    return model


def to_transformers(model: FlavaForPretraining):
    """Our model -> a transformers ``FlavaForPreTraining`` in eval mode with the same weights (its unused tower
    poolers keep transformers' initialisation)."""
    import transformers  # optional extra (pyproject "pipeline"), ~0.6 s to import: only these functions need it

    codebook = model.codebook if isinstance(model.codebook, DalleCodebook) else None
    hf = transformers.FlavaForPreTraining(to_transformers_config(model.config, codebook))
    state = to_transformers_state_dict(model)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(HF_ONLY_PREFIXES) and not k.endswith(("position_ids",
                                                                                           "token_type_ids"))]
    if missing or unexpected:
        raise ValueError(f"conversion to transformers left missing {missing[:8]}, unexpected {unexpected[:8]}")
    return hf.eval()


def _read_safetensors_checkpoint(directory: Path) -> dict[str, torch.Tensor]:
    names = ("model.safetensors", "model.safetensors.index.json")
    if not any((directory / name).exists() for name in names) and any(directory.glob("*.bin")):
        raise ValueError(
            f"{directory} holds only pickled weights (*.bin), which are never loaded here; convert them to "
            "safetensors first (e.g. transformers' save_pretrained(safe_serialization=True) in a trusted setting)"
        )
    state: dict[str, torch.Tensor] = {}
    for path in checkpoint_weight_files(directory):
        state.update(load_file(str(path)))
    return state


def read_transformers_checkpoint(
    local_dir: str | Path, *, attention: str = "sdpa"
) -> tuple[FlavaConfig, dict[str, torch.Tensor], DalleCodebook | None]:
    """A transformers FLAVA checkpoint already on disk -> (our config, its weights under our names, its DALL-E
    codebook or None). Never downloads and never unpickles. A bare ``FlavaModel`` checkpoint converts without
    its pretraining heads."""
    import transformers  # optional extra (pyproject "pipeline"), ~0.6 s to import: only these functions need it

    directory = Path(local_dir)
    if not (directory / "config.json").exists():
        raise FileNotFoundError(f"{directory} has no config.json (expected a transformers FLAVA checkpoint)")
    raw = json.loads((directory / "config.json").read_text())
    if raw.get("model_type") != "flava":
        raise ValueError(f"{directory}/config.json has model_type {raw.get('model_type')!r}, expected 'flava'")
    hf_config = transformers.FlavaConfig.from_pretrained(str(directory), local_files_only=True)
    cfg = from_transformers_config(hf_config, attention=attention)
    hf_state = _read_safetensors_checkpoint(directory)
    codebook = _codebook_from_hf_state(hf_state, hf_config.to_dict().get("image_codebook_config"))
    if codebook is not None and codebook.num_codes != cfg.codebook_size:
        codebook = None
    return cfg, from_transformers_state_dict(hf_state, cfg, allow_missing_heads=True), codebook


def load_transformers_checkpoint(local_dir: str | Path, *, attention: str = "sdpa") -> FlavaForPretraining:
    """Load a transformers FLAVA checkpoint already on disk (``config.json`` + safetensors weights), e.g.
    ``facebook/flava-full`` downloaded by the user. Never downloads and never unpickles. Missing pretraining
    heads (a bare ``FlavaModel`` checkpoint) keep their fresh initialisation, with a warning."""
    cfg, state, codebook = read_transformers_checkpoint(local_dir, attention=attention)
    model = FlavaForPretraining(cfg, codebook=codebook)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys:
        log.warning("checkpoint %s has no weights for %d tensors (kept freshly initialised): %s", local_dir,
                    len(result.missing_keys), result.missing_keys[:8])
    return model


def is_transformers_checkpoint(directory: str | Path) -> bool:
    """Whether ``directory`` holds a transformers FLAVA model (``config.json`` with model_type ``flava``)."""
    config = Path(directory) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "flava"


def checkpoint_weight_files(directory: str | Path) -> list[Path]:
    """The safetensors files holding a transformers checkpoint's weights, in a fixed order."""
    directory = Path(directory)
    if (directory / "model.safetensors").exists():
        return [directory / "model.safetensors"]
    index = directory / "model.safetensors.index.json"
    if index.exists():
        return [directory / s for s in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    raise FileNotFoundError(f"{directory} has no model.safetensors or model.safetensors.index.json")


def load_transformers_codebook(local_dir: str | Path) -> DalleCodebook:
    """The DALL-E codebook held in a transformers ``FlavaForPreTraining`` checkpoint (``image_codebook.*``, shaped
    by its config's ``image_codebook_config``), e.g. a downloaded ``facebook/flava-full``. Reads only the
    safetensors weights; never downloads."""
    directory = Path(local_dir)
    if not is_transformers_checkpoint(directory):
        raise ValueError(f"{directory} is not a transformers FLAVA checkpoint (config.json with model_type 'flava')")
    raw = json.loads((directory / "config.json").read_text())
    codebook = _codebook_from_hf_state(_read_safetensors_checkpoint(directory), raw.get("image_codebook_config"))
    if codebook is None:
        raise ValueError(f"{directory} holds no image_codebook.* weights (a FlavaModel, or saved with "
                         "init_codebook=False): point data.codebook.dalle_dir at a FlavaImageCodebook directory")
    return codebook
