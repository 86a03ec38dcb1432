"""Plain PyTorch forward of a Nano VL v2 checkpoint, independent of vLLM: the test oracle.

Vision: RADIO ViT written out from its formula (patchify -> linear -> + pos_embed ->
prepend cls/register tokens -> pre-norm blocks -> drop the prefix tokens), pixel
shuffle 0.5, `mlp1`. Language: transformers' `NemotronHForCausalLM` on the merged
embeddings, and its blocks one by one for the *reduced* forward: one request, whole
sequence, no cache, no metadata - after each boundary block the dropped rows are
simply removed, and greedy decoding re-runs the sequence with the same kept rows.
Nothing here imports vLLM's model code.

A position grid larger than the frame grid (the real checkpoint's 2048 px) is
bilinearly resized to it, as RADIO's CPE does for square frames.
"""

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import AutoTokenizer, NemotronHConfig, NemotronHForCausalLM, PretrainedConfig

from ..config import ReductionConfig
from ..model.tokens import SpecialTokens
from ..schedule import SCORING_KINDS, boundary_blocks, build_schedule


def unified_scores(scores: torch.Tensor, how: str) -> torch.Tensor:
    """A block's scores over a request's visual tokens on the common scale (`score_norm`):
    divided by their sum, or z-scored (a single token gets 0)."""
    if how == "sum":
        return scores / scores.sum()
    if len(scores) < 2:
        return torch.zeros_like(scores)
    return (scores - scores.mean()) / scores.std().clamp_min(1e-30)


class TensorDict(nn.Module):
    """Checkpoint tensors under their dotted names, as trainable parameters."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.names = list(tensors)
        self.params = nn.ParameterList(nn.Parameter(t, requires_grad=t.is_floating_point()) for t in tensors.values())

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.params[self.names.index(name)]

    def items(self):
        return zip(self.names, self.params, strict=True)


class ReferenceNanoVL(nn.Module):
    def __init__(self, checkpoint: str | Path, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        ckpt = Path(checkpoint)
        self.config, _ = PretrainedConfig.get_config_dict(ckpt)
        tensors = {
            k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(ckpt / "model.safetensors").items()
        }
        self.vit = TensorDict(
            {
                k.removeprefix("vision_model.radio_model."): v
                for k, v in tensors.items()
                if k.startswith("vision_model.")
            }
        )
        self.mlp1 = TensorDict({k.removeprefix("mlp1."): v for k, v in tensors.items() if k.startswith("mlp1.")})
        text_config = NemotronHConfig(**self.config["llm_config"])
        self.lm = NemotronHForCausalLM(text_config).to(dtype).eval()
        lm_state = {k.removeprefix("language_model."): v for k, v in tensors.items() if k.startswith("language_model.")}
        self.lm.load_state_dict(lm_state, strict=True)
        args = self.config["vision_config"]["args"]
        self.vit_heads = args["num_attention_heads"]
        self.vit_layers = args["num_hidden_layers"]
        self.patch = self.config["patch_size"]
        tokens = SpecialTokens.from_tokenizer(AutoTokenizer.from_pretrained(ckpt))
        self.image_context_id = tokens.image_context  # from the tokenizer, as vLLM's model takes it
        self.video_end_length = len(tokens.image_end)
        side = self.config["force_image_size"] // self.config["patch_size"]
        self.tokens_per_tile = int(side * side * self.config["downsample_ratio"] ** 2)  # per frame or image tile
        kinds = {"mamba": "M", "linear_attention": "M", "attention": "*", "full_attention": "*"}
        self.pattern = "".join(kinds.get(k, "-") for k in self.config["llm_config"]["layers_block_type"])

    def checkpoint_tensors(self, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
        """All weights under the checkpoint's names (for saving after training)."""
        out = {f"vision_model.radio_model.{k}": v for k, v in self.vit.items()}
        out |= {f"mlp1.{k}": v for k, v in self.mlp1.items()}
        out |= {f"language_model.{k}": v for k, v in self.lm.state_dict().items()}
        return {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous() for k, v in out.items()}

    def vision_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(frames, 3, S, S) normalised pixels -> (frames, S*S/(4*p*p), llm_hidden)."""
        w, p = self.vit, self.patch
        n, _, side, _ = pixel_values.shape
        g = side // p
        # (n, 3, g*p, g*p) -> (n, g*g, 3*p*p), channel-major inside a patch
        x = pixel_values.reshape(n, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(n, g * g, 3 * p * p)
        x = x @ w["model.patch_generator.embedder.weight"].T + self.position_embeddings(g)
        prefix = w["model.patch_generator.cls_token.token"]
        x = torch.cat([prefix.expand(n, -1, -1), x], dim=1)
        for i in range(self.vit_layers):
            b = lambda name, i=i: w[f"model.blocks.{i}.{name}"]  # noqa: E731
            h = F.layer_norm(x, x.shape[-1:], b("norm1.weight"), b("norm1.bias"), eps=1e-6)
            q, k, v = F.linear(h, b("attn.qkv.weight"), b("attn.qkv.bias")).chunk(3, dim=-1)
            heads = lambda t: t.unflatten(-1, (self.vit_heads, -1)).transpose(1, 2)  # noqa: E731
            a = F.scaled_dot_product_attention(heads(q), heads(k), heads(v)).transpose(1, 2).flatten(2)
            x = x + F.linear(a, b("attn.proj.weight"), b("attn.proj.bias"))
            h = F.layer_norm(x, x.shape[-1:], b("norm2.weight"), b("norm2.bias"), eps=1e-6)
            x = x + F.linear(
                F.gelu(F.linear(h, b("mlp.fc1.weight"), b("mlp.fc1.bias"))), b("mlp.fc2.weight"), b("mlp.fc2.bias")
            )
        x = x[:, prefix.shape[0] :]  # drop cls + register tokens
        # pixel shuffle 0.5 (v2): 2x2 neighbours -> channels, row-major
        c = x.shape[-1]
        x = x.reshape(n, g // 2, 2, g // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(n, (g // 2) ** 2, 4 * c)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.mlp1["0.weight"]
        return F.relu(x @ self.mlp1["1.weight"].T).square() @ self.mlp1["3.weight"].T

    def position_embeddings(self, grid: int) -> torch.Tensor:
        """(1, grid*grid, width): the checkpoint's position grid, bilinearly resized to the
        frame's patch grid when they differ (RADIO's CPE for square frames)."""
        pos = self.vit["model.patch_generator.pos_embed"]
        side = math.isqrt(pos.shape[1])
        if side == grid:
            return pos
        square = pos.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
        resized = F.interpolate(square, size=(grid, grid), mode="bilinear", align_corners=False).to(pos.dtype)
        return resized.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)

    @torch.no_grad()
    def logits(self, input_ids: list[int], pixel_values: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """(len(input_ids), vocab) logits; video i's features fill its `<image>` slots in order."""
        return self.lm(inputs_embeds=self.embeds(input_ids, pixel_values)[None]).logits[0]

    def embeds(self, input_ids: list[int], pixel_values: Sequence[torch.Tensor]) -> torch.Tensor:
        ids = torch.tensor(input_ids)
        embeds = self.lm.get_input_embeddings()(ids)
        if pixel_values:
            visual = torch.cat([self.vision_embeddings(pv).flatten(0, 1) for pv in pixel_values])
            slots = ids == self.image_context_id
            if int(slots.sum()) != visual.shape[0]:
                raise ValueError(f"{int(slots.sum())} <image> slots for {visual.shape[0]} visual embeddings")
            embeds[slots] = visual.to(embeds.dtype)
        return embeds

    # ------------------------------------------------------------ reduced forward

    def visual_and_query(
        self,
        input_ids: list[int],
        prompt_len: int,
        pixel_values: Sequence[torch.Tensor] = (),
        modalities: Sequence[str] | None = None,
        reduced: Sequence[str] = ("video",),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions of the visual tokens of the `reduced` modalities and of the question
        Q: the prompt text after the last media's closing `</img>` (empty without media).
        `modalities[i]` is what `pixel_values[i]` is (default: all videos); each item owns
        the next tiles-or-frames x tokens-per-tile context slots of the prompt."""
        slots = torch.nonzero(torch.tensor(input_ids[:prompt_len]) == self.image_context_id).flatten()
        kinds = list(modalities or ["video"] * len(pixel_values))
        per_item = [len(pv) * self.tokens_per_tile for pv in pixel_values] or [len(slots)]
        owner = torch.repeat_interleave(torch.arange(len(per_item)), torch.tensor(per_item))
        if len(owner) != len(slots):
            raise ValueError(f"{len(slots)} <image> slots for media of {len(owner)} visual tokens")
        visual = slots[torch.tensor([(kinds or ["video"])[int(o)] in reduced for o in owner], dtype=torch.bool)]
        query = torch.arange(int(slots[-1]) + 1 + self.video_end_length, prompt_len) if len(slots) else torch.arange(0)
        return visual, query

    def run_block(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Block i of the language model on whole sequences, (L, hidden) or (B, L, hidden), causal."""
        x = h if h.dim() == 3 else h[None]
        causal = (
            torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()[None, None] if self.pattern[i] == "*" else None
        )
        y = self.lm.model.layers[i](x, attention_mask=causal)
        return y if h.dim() == 3 else y[0]

    def attention_scores(self, block, h: torch.Tensor, q_rows: torch.Tensor, v_rows: torch.Tensor) -> torch.Tensor:
        """mean_{t in Q, heads} softmax_s(q_t . k_s / sqrt(d)), causal, at the visual columns."""
        attn, x = block.mixer, block.norm(h)
        d = attn.head_dim
        q = attn.q_proj(x).view(len(x), -1, d)[q_rows]  # (T, Hq, d)
        k = attn.k_proj(x).view(len(x), -1, d).repeat_interleave(attn.num_key_value_groups, dim=1)
        logits = torch.einsum("thd,shd->hts", q, k) * d**-0.5
        future = torch.arange(len(x))[None, :] > q_rows[:, None]
        probs = logits.masked_fill(future, float("-inf")).softmax(-1)
        return probs.mean(dim=(0, 1))[v_rows]

    def mamba_scores(self, block, h, q_rows, v_rows, use_dt: bool, decay: bool) -> torch.Tensor:
        """mean_t sum_h |C_t . B_s| dt_s,h [exp(A_h (cumdt_t - cumdt_s))], B/C after conv1d+SiLU."""
        m, x = block.mixer, block.norm(h)
        proj = m.in_proj(x)
        xbc = proj[:, m.intermediate_size : m.intermediate_size + m.conv_dim]
        dt = F.softplus(proj[:, m.intermediate_size + m.conv_dim :] + m.dt_bias)  # (L, H)
        xbc = m.act(m.conv1d(xbc.T[None])[0, :, : len(x)].T)
        gn = m.n_groups * m.ssm_state_size
        b = xbc[:, -2 * gn : -gn].view(len(x), m.n_groups, -1)
        c = xbc[:, -gn:].view(len(x), m.n_groups, -1)
        heads_per_group = m.num_heads // m.n_groups
        cb = torch.einsum("tgn,sgn->tsg", c[q_rows], b[v_rows]).abs().repeat_interleave(heads_per_group, dim=2)
        w = dt[v_rows][None] if use_dt else torch.ones_like(cb)
        if decay:
            cum = dt.cumsum(0)
            w = w * torch.exp(-torch.exp(m.A_log)[None, None] * (cum[q_rows][:, None] - cum[v_rows][None]))
        return (cb * w).sum(dim=2).mean(0)

    def _evs_keep(self, embeds: torch.Tensor, rate: float) -> torch.Tensor:
        """Visual tokens to keep: most changed since the previous frame (same spatial
        slot, 1 - cosine similarity), the first frame always; int(N (1 - rate)) of them."""
        per_frame = self.tokens_per_tile
        frames = embeds.view(-1, per_frame, embeds.shape[-1])
        change = 1 - F.cosine_similarity(frames[1:], frames[:-1], dim=-1)
        change = torch.cat([torch.full((1, per_frame), 255.0), change]).flatten()
        count = max(per_frame, int(len(embeds) * (1 - rate)))
        return torch.sort(torch.sort(change, descending=True, stable=True).indices[:count]).values

    @torch.no_grad()
    def reduced_forward(
        self,
        input_ids: list[int],
        pixel_values: list[torch.Tensor],
        config: ReductionConfig,
        num_prompt_tokens: int | None = None,
        kept: list[torch.Tensor] | None = None,
        modalities: Sequence[str] | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Last-position logits and, per stage, the kept original positions of the visual
        tokens. With `kept` given, those rows are kept (decode steps) instead of scoring.
        `modalities`: what each of `pixel_values` is (default: videos). With `evs_rate`
        (one video), the prompt is the video's full layout and its most static tokens are
        removed before block 0: the sequence an EVS-shortened prompt holds."""
        if config.selection != "scores":
            raise ValueError("the reference implements score-based selection only")
        pattern = self.pattern
        num_prompt = num_prompt_tokens or len(input_ids)
        visual, query = self.visual_and_query(input_ids, num_prompt, pixel_values, modalities, config.modalities)
        boundaries = boundary_blocks(pattern, config)
        reduce = config.enabled and len(visual) > 0 and len(query) > 0
        rows = torch.arange(len(input_ids))  # original position of each current row
        h = self.embeds(input_ids, pixel_values)
        out_kept: list[torch.Tensor] = [visual]
        if config.evs_rate and len(visual):  # EVS before the LLM: drop the most static tokens
            out_kept = [kept[0] if kept is not None else visual[self._evs_keep(h[visual], config.evs_rate)]]
            stay = ~torch.isin(rows, visual) | torch.isin(rows, out_kept[0])
            h, rows = h[stay], rows[stay]
        keep = build_schedule(pattern, config).keep_counts(len(out_kept[0]), config.min_keep) if len(visual) else []
        scores = torch.zeros(len(out_kept[0]))
        stage = 0
        for i, block in enumerate(self.lm.model.layers):
            kind = SCORING_KINDS.get(pattern[i])
            scoring = (
                reduce and kept is None and stage < len(boundaries) and kind and config.score_layers in ("all", kind)
            )
            if scoring:
                local = {int(p): j for j, p in enumerate(rows)}
                q_rows = torch.tensor([local[int(p)] for p in query])
                v_rows = torch.tensor([local[int(p)] for p in out_kept[-1]])
                s = (
                    self.attention_scores(block, h, q_rows, v_rows)
                    if kind == "attention"
                    else self.mamba_scores(block, h, q_rows, v_rows, config.mamba_dt, config.mamba_decay)
                )
                scores = scores + unified_scores(s, config.score_norm)
            h = self.run_block(i, h)
            if reduce and stage < len(boundaries) and i == boundaries[stage]:
                stage += 1
                if kept is None:
                    top = torch.sort(torch.sort(scores, descending=True, stable=True).indices[: keep[stage]]).values
                    out_kept.append(out_kept[-1][top])
                    stage_has_scores = any(
                        SCORING_KINDS.get(pattern[b]) and config.score_layers in ("all", SCORING_KINDS[pattern[b]])
                        for b in range(i + 1, (boundaries + [len(pattern) - 1])[stage] + 1)
                    )
                    scores = torch.zeros(len(top)) if stage_has_scores else scores[top]
                else:
                    out_kept.append(kept[stage])
                is_visual = torch.isin(rows, visual)
                stay = ~is_visual | torch.isin(rows, out_kept[-1])
                h, rows = h[stay], rows[stay]
        h = self.lm.model.norm_f(h)
        return self.lm.lm_head(h[-1]), out_kept

    def forward_kept(
        self, embeds: torch.Tensor, kept: list[list[torch.Tensor]], config: ReductionConfig
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Differentiable language-model forward of a batch (B, L, hidden), dropping after
        each boundary the visual tokens a row's `kept` (per stage, from `reduced_forward`;
        stage 0 = all its visual tokens) leaves out: training under reduction. Every row
        must keep as many tokens per stage. Returns final hidden states and each remaining
        row's original position, both (B, L', ...)."""
        if config.evs_rate:
            raise ValueError("forward_kept does not drop tokens before the language model (evs_rate)")
        boundaries = boundary_blocks(self.pattern, config)
        rows = torch.arange(embeds.shape[1]).expand(len(embeds), -1)
        h, stage, is_visual = embeds, 0, torch.stack([torch.isin(r, k[0]) for r, k in zip(rows, kept, strict=True)])
        for i in range(len(self.pattern)):
            h = self.run_block(i, h)
            if stage < len(boundaries) and i == boundaries[stage]:
                stage += 1
                stay = ~is_visual | torch.stack([torch.isin(r, k[stage]) for r, k in zip(rows, kept, strict=True)])
                h, rows, is_visual = (t[stay].view(len(t), -1, *t.shape[2:]) for t in (h, rows, is_visual))
        return self.lm.model.norm_f(h), rows

    @torch.no_grad()
    def greedy(
        self,
        input_ids: list[int],
        pixel_values: list[torch.Tensor],
        config: ReductionConfig,
        max_tokens: int,
        modalities: Sequence[str] | None = None,
    ):
        """Greedy tokens, their log-probabilities (full vocab) and the kept positions."""
        ids, kept, tokens, logprobs = list(input_ids), None, [], []
        for _ in range(max_tokens):
            logits, got = self.reduced_forward(ids, pixel_values, config, len(input_ids), kept, modalities)
            kept = kept or got
            lp = torch.log_softmax(logits.double(), -1)
            tokens.append(int(lp.argmax()))
            logprobs.append(lp)
            ids.append(tokens[-1])
        return tokens, torch.stack(logprobs), kept
