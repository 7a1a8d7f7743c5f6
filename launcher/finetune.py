"""Fine-tuning methods: full, LoRA / prompt tuning / IA3 (peft), prefix tuning, bottleneck adapters,
BitFit - applied to a task's model before the optimizer sees it, and saved/loaded so that every
method's export reloads on its own.

What each method trains:
    full           every weight
    lora, ia3      peft's injected weights + the task head (peft's modules_to_save for the task type)
    prompt_tuning  peft's virtual-token embeddings (+ the task head for classification tasks)
    prefix_tuning  learned key/value prefixes for every attention layer, handed to a decoder model
                   as a pre-filled cache (+ the task head)
    adapter        a residual bottleneck (down, GELU, up; up starts at zero) after every transformer
                   block + the task head; everything else frozen
    bitfit         every bias + the task head
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .errors import ModelError
from .model_io import drop_gguf_quantization, gguf_location

EXPORT_META = "launcher_finetune.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_BLOCK_LISTS = ("layer", "layers", "h", "block", "blocks")


class BottleneckAdapter(nn.Module):
    """h + up(gelu(down(h))); `up` starts at zero so the adapted model starts as the base model."""

    def __init__(self, hidden_size: int, adapter_size: int):
        super().__init__()
        self.down = nn.Linear(hidden_size, adapter_size)
        self.up = nn.Linear(adapter_size, hidden_size)
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.up(nn.functional.gelu(self.down(hidden)))


class PrefixEncoder(nn.Module):
    """Learned key/value prefixes for every attention layer (prefix tuning, Li & Liang 2021)."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_virtual_tokens: int):
        super().__init__()
        self.prefix = nn.Parameter(torch.randn(num_layers, 2, num_kv_heads, num_virtual_tokens, head_dim) * 0.02)

    def forward(self) -> torch.Tensor:
        # Called as a module (not by reading .prefix) so that ZeRO-3 gathers the partitioned parameter.
        return self.prefix


def _prefix_geometry(config) -> tuple[int, int, int]:
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if hidden and heads else None)
    if not (layers and kv_heads and head_dim):
        raise ModelError(f"finetune.method=prefix_tuning: cannot read the attention geometry of this {config.model_type} config")
    return layers, kv_heads, head_dim


def _with_prefix(module, args, kwargs):
    """Forward pre-hook: hand the model its learned prefix as an already-filled KV cache, and let
    every token attend to it."""
    from transformers import DynamicCache

    input_ids = kwargs.get("input_ids", args[0] if args else None)
    reference = input_ids if input_ids is not None else kwargs["inputs_embeds"]
    batch = reference.shape[0]
    prefix = module.launcher_prefix()
    layers = [(prefix[i, 0].unsqueeze(0).expand(batch, -1, -1, -1), prefix[i, 1].unsqueeze(0).expand(batch, -1, -1, -1))
              for i in range(prefix.shape[0])]
    kwargs["cache"] = DynamicCache(ddp_cache_data=layers, config=module.config)
    mask = kwargs.get("attention_mask")
    if mask is not None:
        kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, prefix.shape[3]), mask], dim=1)
    return args, kwargs


def attach_prefix(model: nn.Module, num_virtual_tokens: int) -> None:
    import inspect

    if "cache" not in inspect.signature(model.forward).parameters:
        raise ModelError(
            f"finetune.method=prefix_tuning needs a decoder model that takes a key/value cache (GPT-2, Llama, "
            f"Qwen, ...); this {model.config.model_type} model does not: use prompt_tuning, lora or adapter"
        )
    layers, kv_heads, head_dim = _prefix_geometry(model.config)
    model.add_module("launcher_prefix", PrefixEncoder(layers, kv_heads, head_dim, num_virtual_tokens))
    model.register_forward_pre_hook(_with_prefix, with_kwargs=True)


def _after_block(module, args, output):
    if isinstance(output, tuple):
        return (module.launcher_adapter(output[0]), *output[1:])
    if torch.is_tensor(output):
        return module.launcher_adapter(output)
    output[0] = module.launcher_adapter(output[0])  # ModelOutput-like
    return output


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    blocks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and name.rsplit(".", 1)[-1] in _BLOCK_LISTS:
            blocks.extend(module)
    return blocks


def attach_adapters(model: nn.Module, adapter_size: int) -> int:
    """A bottleneck adapter after every transformer block; returns how many were attached."""
    hidden = getattr(model.config, "hidden_size", None) or getattr(model.config, "d_model", None)
    blocks = transformer_blocks(model)
    if not blocks or hidden is None:
        raise ModelError(
            f"finetune.method=adapter: no transformer blocks found in this {model.config.model_type} model "
            f"(looked for module lists named {', '.join(_BLOCK_LISTS)}); use lora or full"
        )
    for block in blocks:
        block.add_module("launcher_adapter", BottleneckAdapter(hidden, adapter_size))
        block.register_forward_hook(_after_block)
    return len(blocks)


def checkpointing_refusal(model: nn.Module) -> str | None:
    """Why training.gradient_checkpointing cannot be used with this model, or None if it can."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        model_type = getattr(getattr(model, "config", None), "model_type", "?")
        return (f"training.gradient_checkpointing: this {model_type} model ({type(model).__name__}) does not support "
                f"gradient checkpointing; set training.gradient_checkpointing=false")
    return None


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Keep only each transformer layer's input in forward and recompute the layer in backward.

    Non-reentrant torch checkpointing: it restores the RNG state for the recomputation (the same dropout
    masks, so the same losses), works when only adapter weights require grad, and with ZeRO-3's parameter
    hooks. transformers wraps each layer's `forward`, so module hooks - the launcher's adapters, ZeRO-3's
    gathers - run once, outside the recomputation. Called before the fine-tuning method is applied."""
    refusal = checkpointing_refusal(model)
    if refusal:
        raise ModelError(refusal)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def _is_head(name: str, heads: tuple[str, ...]) -> bool:
    return any(part in heads for part in name.split("."))


def apply_method(model: nn.Module, recipe, task) -> nn.Module:
    """Return the model to train under recipe.finetune (possibly a peft wrapper)."""
    options = recipe.finetune
    method = options.method
    heads = tuple(task.head_modules)
    if method == "full":
        return model
    if method == "bitfit":
        for name, param in model.named_parameters():
            param.requires_grad = name.endswith(".bias") or _is_head(name, heads)
        return model
    if method in OWN_METHODS:
        for param in model.parameters():
            param.requires_grad = False
        if method == "adapter":
            attach_adapters(model, options.adapter_size)
        else:
            attach_prefix(model, options.num_virtual_tokens)
        for name, param in model.named_parameters():
            if "launcher_adapter" in name or "launcher_prefix" in name or _is_head(name, heads):
                param.requires_grad = True
        return model
    return _peft_model(model, options, task)


# Implemented here rather than with peft: bottleneck adapters (not in peft), and prefix tuning
# (peft 0.21 passes `past_key_values`, which transformers 5 models no longer accept: they take `cache`).
OWN_METHODS = ("adapter", "prefix_tuning")


def _peft_model(model, options, task):
    import peft

    task_type = getattr(peft.TaskType, task.peft_task_type)
    common = {"task_type": task_type}
    method = options.method
    if method == "lora":
        config = peft.LoraConfig(r=options.lora_r, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
                                 target_modules=options.target_modules, **common)
    elif method == "ia3":
        config = peft.IA3Config(target_modules=options.target_modules, **common)
    else:
        config = peft.PromptTuningConfig(num_virtual_tokens=options.num_virtual_tokens, **common)
    try:
        return peft.get_peft_model(model, config)
    except (ValueError, TypeError, NotImplementedError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"finetune.method={method} does not support this {model.config.model_type} model ({first}); "
            f"set finetune.target_modules, or choose another method (lora, adapter, bitfit, full)"
        ) from None


def is_peft(module: nn.Module) -> bool:
    try:
        import peft
    except ImportError:
        return False
    return isinstance(module, peft.PeftModel)


# -------------------------------------------------------------------------------------------
# Saving and loading: what `model/` holds for each method.

def trainable_state(module: nn.Module, state: dict) -> dict:
    names = {name for name, param in module.named_parameters() if param.requires_grad}
    return {name: tensor for name, tensor in state.items() if name in names}


def save_weights(module: nn.Module, directory: Path, state: dict, recipe, task) -> None:
    """Write `module`'s weights for `recipe.finetune.method` (state: the full gathered state dict)."""
    method = recipe.finetune.method
    meta = {"method": method, "task": recipe.task, "auto_model_class": task.auto_model_class,
            "base_model": None, "config": task.model_config_kwargs(), "adapter_size": recipe.finetune.adapter_size,
            "num_virtual_tokens": recipe.finetune.num_virtual_tokens}
    if is_peft(module):
        module.save_pretrained(directory, state_dict=state, safe_serialization=True)
        meta["base_model"] = module.peft_config["default"].base_model_name_or_path
    elif method in OWN_METHODS:
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in trainable_state(module, state).items()}, str(directory / ADAPTER_WEIGHTS))
        module.config.save_pretrained(directory)
        meta["base_model"] = module.config._name_or_path
    else:
        # save_original_format=False: write the names the model has in memory. transformers 5 would
        # otherwise "revert" load-time renamings, and under ZeRO-3 it records the legacy
        # LayerNorm.weight -> gamma renaming, exporting keys no plain BERT has.
        module.save_pretrained(directory, state_dict=state, safe_serialization=True, save_original_format=False)
    if getattr(recipe.model, "gguf_file", None) and meta["base_model"] is not None:
        # The base is a GGUF file: name its directory and file, which is how it reloads.
        meta["base_model"], meta["gguf_file"] = gguf_location(recipe)
    (directory / EXPORT_META).write_text(json.dumps(meta, indent=2) + "\n")


def read_weights(directory: Path) -> dict:
    """The weights `save_weights` wrote, keyed like the live module's state dict."""
    from safetensors.torch import load_file

    meta = json.loads((directory / EXPORT_META).read_text()) if (directory / EXPORT_META).exists() else {"method": "full"}
    if meta["method"] in ("full", "bitfit"):
        return load_file(str(directory / "model.safetensors"))
    return load_file(str(directory / ADAPTER_WEIGHTS))


def load_into(module: nn.Module, state: dict) -> None:
    """Load `read_weights` output into a live (unwrapped, not ZeRO-3-partitioned) module."""
    if is_peft(module):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(module, state)
        return
    missing, unexpected = module.load_state_dict(state, strict=False)
    if unexpected:
        raise RuntimeError(f"restoring weights: unexpected keys {unexpected[:5]}")


def load_exported(directory: str | Path, device: str = "cpu"):
    """Rebuild a model exported by the launcher, whatever the method: (model, tokenizer)."""
    import transformers

    directory = Path(directory)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    meta_path = directory / EXPORT_META
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {"method": "full"}
    auto = getattr(transformers, meta.get("auto_model_class", "AutoModelForSequenceClassification"))
    if meta["method"] in ("full", "bitfit"):
        return auto.from_pretrained(directory).to(device).eval(), tokenizer
    config = dict(meta.get("config") or {})
    if "id2label" in config:
        config["id2label"] = {int(k): v for k, v in config["id2label"].items()}
    if meta.get("gguf_file"):
        base = auto.from_pretrained(meta["base_model"], gguf_file=meta["gguf_file"], **config)
        drop_gguf_quantization(base)  # dequantized on load; a merged export must save as a plain model
    else:
        base = auto.from_pretrained(meta["base_model"], **config)
    if len(tokenizer) > base.get_input_embeddings().num_embeddings:
        # The task added tokens (relation_extraction's entity markers) and resized the embeddings; peft
        # saved the grown matrix with the adapter, which loads only into a base of the same size.
        base.resize_token_embeddings(len(tokenizer))
    if meta["method"] in OWN_METHODS:
        for param in base.parameters():
            param.requires_grad = False
        if meta["method"] == "adapter":
            attach_adapters(base, meta["adapter_size"])
        else:
            attach_prefix(base, meta["num_virtual_tokens"])
        load_into(base, read_weights(directory))
        return base.to(device).eval(), tokenizer
    import peft

    model = peft.PeftModel.from_pretrained(base, directory)
    return model.to(device).eval(), tokenizer


def export_merged(adapter_dir: Path, target: Path) -> None:
    """LoRA/IA3: the base model with the adapter folded in, as a plain save_pretrained folder."""
    model, tokenizer = load_exported(adapter_dir)
    merged = model.merge_and_unload()
    merged.save_pretrained(target, safe_serialization=True, save_original_format=False)
    tokenizer.save_pretrained(target)
