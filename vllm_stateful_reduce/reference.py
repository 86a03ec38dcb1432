"""Plain PyTorch forward of a Nano VL v2 checkpoint, independent of vLLM: the test oracle.

Vision: RADIO ViT written out from its formula (patchify -> linear -> + pos_embed ->
prepend cls/register tokens -> pre-norm blocks -> drop the prefix tokens), pixel
shuffle 0.5, `mlp1`. Language: transformers' `NemotronHForCausalLM` on the merged
embeddings. Nothing here imports vLLM's model code.

Covers checkpoints whose RADIO position grid equals the frame grid (the small
checkpoints built here); the real model interpolates position embeddings (CPE).
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import NemotronHConfig, NemotronHForCausalLM, PretrainedConfig


class ReferenceNanoVL:
    def __init__(self, checkpoint: str | Path, dtype: torch.dtype = torch.float32) -> None:
        ckpt = Path(checkpoint)
        self.config, _ = PretrainedConfig.get_config_dict(ckpt)
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(ckpt / "model.safetensors").items()}
        self.vit = {k.removeprefix("vision_model.radio_model."): v for k, v in tensors.items() if k.startswith("vision_model.")}
        self.mlp1 = {k.removeprefix("mlp1."): v for k, v in tensors.items() if k.startswith("mlp1.")}
        text_config = NemotronHConfig(**self.config["llm_config"])
        self.lm = NemotronHForCausalLM(text_config).to(dtype).eval()
        lm_state = {k.removeprefix("language_model."): v for k, v in tensors.items() if k.startswith("language_model.")}
        self.lm.load_state_dict(lm_state, strict=True)
        args = self.config["vision_config"]["args"]
        self.vit_heads = args["num_attention_heads"]
        self.vit_layers = args["num_hidden_layers"]
        self.patch = self.config["patch_size"]
        self.image_context_id = self.config["img_context_token_id"]

    @torch.no_grad()
    def vision_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(frames, 3, S, S) normalised pixels -> (frames, S*S/(4*p*p), llm_hidden)."""
        w, p = self.vit, self.patch
        n, _, side, _ = pixel_values.shape
        g = side // p
        # (n, 3, g*p, g*p) -> (n, g*g, 3*p*p), channel-major inside a patch
        x = pixel_values.reshape(n, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(n, g * g, 3 * p * p)
        x = x @ w["model.patch_generator.embedder.weight"].T + w["model.patch_generator.pos_embed"]
        prefix = w["model.patch_generator.cls_token.token"]
        x = torch.cat([prefix.expand(n, -1, -1), x], dim=1)
        for i in range(self.vit_layers):
            b = lambda name: w[f"model.blocks.{i}.{name}"]  # noqa: E731
            h = F.layer_norm(x, x.shape[-1:], b("norm1.weight"), b("norm1.bias"), eps=1e-6)
            q, k, v = F.linear(h, b("attn.qkv.weight"), b("attn.qkv.bias")).chunk(3, dim=-1)
            heads = lambda t: t.unflatten(-1, (self.vit_heads, -1)).transpose(1, 2)  # noqa: E731
            a = F.scaled_dot_product_attention(heads(q), heads(k), heads(v)).transpose(1, 2).flatten(2)
            x = x + F.linear(a, b("attn.proj.weight"), b("attn.proj.bias"))
            h = F.layer_norm(x, x.shape[-1:], b("norm2.weight"), b("norm2.bias"), eps=1e-6)
            x = x + F.linear(F.gelu(F.linear(h, b("mlp.fc1.weight"), b("mlp.fc1.bias"))), b("mlp.fc2.weight"), b("mlp.fc2.bias"))
        x = x[:, prefix.shape[0] :]  # drop cls + register tokens
        # pixel shuffle 0.5 (v2): 2x2 neighbours -> channels, row-major
        c = x.shape[-1]
        x = x.reshape(n, g // 2, 2, g // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(n, (g // 2) ** 2, 4 * c)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.mlp1["0.weight"]
        return F.relu(x @ self.mlp1["1.weight"].T).square() @ self.mlp1["3.weight"].T

    @torch.no_grad()
    def logits(self, input_ids: list[int], pixel_values: list[torch.Tensor] = ()) -> torch.Tensor:
        """(len(input_ids), vocab) logits; video i's features fill its `<image>` slots in order."""
        ids = torch.tensor(input_ids)
        embeds = self.lm.get_input_embeddings()(ids)
        if pixel_values:
            visual = torch.cat([self.vision_embeddings(pv).flatten(0, 1) for pv in pixel_values])
            slots = ids == self.image_context_id
            if int(slots.sum()) != visual.shape[0]:
                raise ValueError(f"{int(slots.sum())} <image> slots for {visual.shape[0]} visual embeddings")
            embeds[slots] = visual.to(embeds.dtype)
        return self.lm(inputs_embeds=embeds[None]).logits[0]
