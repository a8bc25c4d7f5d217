"""The trainable unit: `Policy`, a Qwen2.5-VL whose forward returns per-token log-probs, and what it runs on.

- `ChunkedLogProbs` / `token_logprobs`: log p(target | h) and the entropy from temperature-scaled fp32 logits,
  chunk by chunk, so the (tokens x V) logits never exist at once, in the forward or the backward pass.
- `Policy`: the forward of every training stage (SFT's loss, GRPO's ratio, the reference's and the old policy's
  log-probs). It is the FSDP2 root (sharding.py), so `lm_head` is gathered by its own pre-forward hook.
  Three opt-in layouts, each exact against the plain padded forward (tests/test_packing.py, test_model.py):
  `dedupe_images` (a batch's repeated images through the vision tower once), `share_prefix` (a group's prompt
  through the decoder once, its completions on the shared KV cache) and `pack` (`micro_batch_tokens` > 0: the
  batch packed into one row with no padding, `pack_sequences`; attention sequence by sequence through
  flash-attn's varlen path or `varlen_sdpa_attention`, registered with transformers' AttentionInterface).
- `position_ids_for`: the 3-D M-RoPE positions `generate` uses, for a padded training batch.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn
from transformers import Qwen2_5_VLForConditionalGeneration

from model import cache_kwarg, is_gradient_checkpointing, output_cache

# ----------------------------------------------------------------------------------------------------------
# Per-token log-probs and entropies, chunked in the forward and the backward pass


class ChunkedLogProbs(torch.autograd.Function):
    """log p(target | h) and the entropy of p, with p = softmax(h W^T / temperature) in fp32, chunk by chunk.

    Only (chunk x V) logits exist at any time. Backward recomputes each chunk's logits and uses
      d logp_t / dz   = onehot(t) - p
      d H / dz        = -p * (log p + H)          (H = -sum p log p)
    then d/dh = dz W / temperature and d/dW = dz^T h / temperature.

    Every (chunk x V) step works in place in one buffer per call (two for the entropy's backward), allocated once
    and reused by every chunk: on CPU a fresh block that size is new pages from the OS, and faulting them in cost
    more than the arithmetic (a 151k vocabulary: 0.55 s for `z / t` against 0.03 s for `z.div_(t)`, 1024 rows).
    The temperature is applied to h (N x H) rather than to the logits, and the log-sum-exp is taken in place
    (max, subtract, exp, sum), with the entropy as log S - sum_i e_i (z_i - max) / S (e_i = exp(z_i - max),
    S = sum_i e_i) from a row-wise dot product.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature: float, chunk_size: int, with_entropy: bool):
        n, v = hidden.shape[0], weight.shape[0]
        w32 = weight.float()  # one fp32 copy of lm_head per call (a no-op in fp32 training)
        hs = hidden.float() / temperature
        logp = hidden.new_empty(n, dtype=torch.float32)
        lse = hidden.new_empty(n, dtype=torch.float32)
        entropy = hidden.new_zeros(n, dtype=torch.float32)
        buf = hidden.new_empty(min(n, chunk_size), v, dtype=torch.float32)
        buf_e = torch.empty_like(buf) if with_entropy else None
        for s in range(0, n, chunk_size):
            h = hs[s : s + chunk_size]
            m = h.shape[0]
            z = torch.mm(h, w32.T, out=buf[:m])  # the logits
            picked = z.gather(1, targets[s : s + chunk_size, None]).squeeze(1)
            top = z.amax(-1, keepdim=True)
            z.sub_(top)
            e = torch.exp(z, out=buf_e[:m]) if with_entropy else z.exp_()  # e_i = exp(z_i - max)
            total = e.sum(-1, keepdim=True)  # S
            lse[s : s + chunk_size] = (total.log() + top).squeeze(1)
            logp[s : s + chunk_size] = picked - lse[s : s + chunk_size]
            if with_entropy:  # H = log S - sum_i e_i (z_i - max) / S
                dot = torch.bmm(e.unsqueeze(1), z.unsqueeze(2)).flatten()
                entropy[s : s + chunk_size] = total.log().squeeze(1) - dot / total.squeeze(1)
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.temperature, ctx.chunk_size, ctx.with_entropy = temperature, chunk_size, with_entropy
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        t, cs = ctx.temperature, ctx.chunk_size
        n, v = hidden.shape[0], weight.shape[0]
        w32 = weight.float()
        hs = hidden.float() / t
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(w32) if ctx.needs_input_grad[1] else None
        with_entropy = ctx.with_entropy and grad_entropy is not None
        g = grad_logp.float() / t  # the 1/t of dz/dh and dz/dW, folded into the coefficients
        ge = grad_entropy.float() / t if with_entropy else None
        buf = hidden.new_empty(min(n, cs), v, dtype=torch.float32)
        buf_p = torch.empty_like(buf) if with_entropy else None
        for s in range(0, n, cs):
            h = hs[s : s + cs]
            m = h.shape[0]
            logp_all = torch.mm(h, w32.T, out=buf[:m]).sub_(lse[s : s + cs, None])
            if with_entropy:  # gz = -p * (g + ge * (log p + H)) + onehot(t) g
                p = torch.exp(logp_all, out=buf_p[:m])
                gz = logp_all.add_(entropy[s : s + cs, None]).mul_(ge[s : s + cs, None])
                gz.add_(g[s : s + cs, None]).mul_(p).neg_()
            else:  # gz = -p g + onehot(t) g
                gz = logp_all.exp_().mul_(-g[s : s + cs, None])
            gz.scatter_add_(1, targets[s : s + cs, None], g[s : s + cs, None])
            if grad_hidden is not None:
                grad_hidden[s : s + cs] = (gz @ w32).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(gz.T, hidden[s : s + cs].float())  # dz/dW = h / t: 1/t is in gz already
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (N, H), weight (V, H), targets (N,) -> fp32 log-probs (N,) and entropies (N,; zeros if not asked)."""
    with torch.autocast(hidden.device.type, enabled=False):  # the logits are fp32 even under bf16 autocast
        return ChunkedLogProbs.apply(
            hidden, weight, targets, float(temperature), int(chunk_size), bool(with_entropy)
        )


def position_ids_for(
    model: Qwen2_5_VLForConditionalGeneration, input_ids, attention_mask, image_grid_thw, mm_token_type_ids
) -> torch.Tensor:
    """3-D M-RoPE position ids (3, B, T), the same ones `generate` uses (PITFALLS: without
    `mm_token_type_ids` transformers silently falls back to 1-D positions). Text-only batches count
    positions over the attention mask, so left padding does not shift them."""
    if image_grid_thw is not None and len(image_grid_thw):
        pos, _ = model.model.get_rope_index(
            input_ids,
            mm_token_type_ids=mm_token_type_ids,
            image_grid_thw=image_grid_thw,
            attention_mask=attention_mask,
        )
        return pos
    pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return pos.unsqueeze(0).expand(3, -1, -1)


def pack_sequences(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    rows: list[list[int]],
    pad_id: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A padded batch (B, T) packed into len(rows) rows, rows[r] listing the sequences of row r in order:
    (input_ids (R, W), position_ids (4, R, W), where (B, T)), W the longest row, `where[b, t]` the flat index
    (r * W + column) of token (b, t) in the packed rows (-1 for padding).

    Row 0 of the position ids is each sequence's text position, restarting at 0 where a sequence starts; rows 1-3
    are its own 3-D M-RoPE positions (`position_ids`, (3, B, T), as `position_ids_for` computes them per row).
    With `attention_mask=None`, transformers reads row 0 (`find_packed_sequence_indices`: a new sequence wherever
    the position does not go up by 1) and builds a block-diagonal causal mask, so no token attends across a
    sequence boundary; with `NO_MASK`, varlen attention (`varlen_sdpa_attention`, flash-attn) reads the same
    starts from row 0 and builds no mask. A row shorter than W ends in padding whose text positions restart at 0
    too: a block of its own that no real token sees."""
    lengths = attention_mask.sum(-1).tolist()
    width = max(sum(lengths[b] for b in row) for row in rows)
    dev = input_ids.device
    ids = torch.full((len(rows), width), pad_id, dtype=input_ids.dtype, device=dev)
    pos = torch.zeros(4, len(rows), width, dtype=position_ids.dtype, device=dev)
    where = torch.full(input_ids.shape, -1, dtype=torch.long, device=dev)
    for r, row in enumerate(rows):
        col = 0
        for b in row:
            real = attention_mask[b].bool()  # the sequence's tokens, wherever its padding is
            n = lengths[b]
            ids[r, col : col + n] = input_ids[b, real]
            pos[0, r, col : col + n] = torch.arange(n, device=dev)
            pos[1:, r, col : col + n] = position_ids[:, b, real]
            where[b, real] = r * width + col + torch.arange(n, device=dev)
            col += n
        pos[0, r, col:] = torch.arange(width - col, device=dev)  # trailing padding: its own block
    return ids, pos, where


# ----------------------------------------------------------------------------------------------------------
# Varlen attention for packed rows without flash-attn


# the text decoder's attention once a packed forward has run (sdpa otherwise)
VARLEN_ATTENTION = "revisual_varlen"
# The mask mapping a packed forward hands the decoder: no (W x W) mask is built, attention reads the restarting
# text positions instead (flash-attn's varlen path, or `varlen_sdpa_attention`).
NO_MASK = {"full_attention": None, "sliding_attention": None}
_SEGMENTS: dict = {}  # segment_bounds' last result and a weak reference to its positions tensor


def segment_bounds(text_positions: torch.Tensor) -> list[list[tuple[int, int]]]:
    """(start, end) of each sequence in each packed row: a sequence starts wherever the text position does not
    go up by 1 (transformers' `find_packed_sequence_indices` rule). One host sync per call; the result is kept
    for the tensor it came from, so a forward's layers compute it once."""
    cached = _SEGMENTS.get("key")
    if cached is not None and cached() is text_positions:
        return _SEGMENTS["bounds"]
    w = text_positions.shape[-1]
    cuts = (text_positions[:, 1:] - text_positions[:, :-1] != 1).nonzero().tolist()
    starts: list[list[int]] = [[0] for _ in range(text_positions.shape[0])]
    for r, c in cuts:
        starts[r].append(c + 1)
    bounds = [list(zip(s, s[1:] + [w])) for s in starts]
    _SEGMENTS.update(key=weakref.ref(text_positions), bounds=bounds)
    return bounds


def varlen_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention, except on packed rows (no mask, the text positions restarting per sequence:
    `Policy.pack`), where each sequence runs as its own causal sdpa call: attention costs sum(len_i^2), not
    W^2 per row, and no mask is built, so a micro-batch can be one row of up to its token budget with no padding.
    GQA heads stay grouped (`enable_gqa`). Everything else (masks given, decode steps, 3-row positions) goes to
    transformers' `sdpa_attention_forward` unchanged. query (B, H, W, D), key/value (B, kv, W, D) -> (B, W, H, D).
    Registered with transformers' AttentionInterface as VARLEN_ATTENTION, with sdpa's mask function."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_len = query.shape[2]
    if attention_mask is not None or position_ids is None or q_len < 2 or key.shape[2] != q_len:
        kwargs.update(dropout=dropout, scaling=scaling, position_ids=position_ids)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    kw = dict(dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=query.shape[1] != key.shape[1])
    rows = []
    for r, bounds in enumerate(segment_bounds(position_ids)):
        q, k, v = query[r : r + 1], key[r : r + 1], value[r : r + 1]
        rows.append(
            torch.cat([sdpa(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], **kw) for s, e in bounds], dim=2)
        )
    return torch.cat(rows).transpose(1, 2).contiguous(), None


def _register_varlen_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_sdpa_attention)
    AttentionMaskInterface.register(VARLEN_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


_register_varlen_attention()


def use_varlen_attention(model: Qwen2_5_VLForConditionalGeneration) -> bool:
    """Whether the text decoder's attention runs packed rows sequence by sequence (flash-attn's varlen path, or
    `varlen_sdpa_attention`); an sdpa decoder is switched to the latter here, for good (it is sdpa itself on
    every unpacked call, and gradient checkpointing's recomputation must find the same function)."""
    tc = model.config.text_config
    if tc._attn_implementation == "sdpa":
        tc._attn_implementation = VARLEN_ATTENTION
    return tc._attn_implementation in (VARLEN_ATTENTION, "flash_attention_2")


class Policy(nn.Module):
    """The trainable unit: a Qwen2.5-VL whose forward returns per-token log-probs instead of logits.

    forward(batch) -> (logp, entropy), both (B, T) fp32, where logp[b, t] = log p(input_ids[b, t] | tokens < t)
    for positions with `target_mask[b, t]` (zeros elsewhere, and always at t = 0). Only the masked positions
    go through lm_head, in chunks.
    """

    def __init__(self, model: Qwen2_5_VLForConditionalGeneration, chunk_size: int = 1024):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        # Set by `shard`: a batch without images still runs the vision tower on a dummy image (output x 0),
        # so every rank takes part in the tower's FSDP all-gathers (PITFALLS: otherwise ranks deadlock).
        self.always_run_vision = False
        # Opt-in: identical images in a batch (a group's n samples repeat their prompt's) go through the tower
        # once. The gradient is the same up to summation order (~1e-7), which is enough to move a 200-step
        # high-lr run (tests/test_sft.py's format threshold), so it is off unless asked for.
        self.dedupe_images = False
        # Opt-in: each distinct prompt of a batch runs through the decoder once and the batch's sequences that
        # start with it (a group's n samples) attend to its KV cache (`_shared_prefix_hidden`); the plain path
        # runs under gradient checkpointing, which turns the decoder's cache off.
        self.share_prefix = False
        # Opt-in (sft.py / grpo_mm.py `micro_batch_tokens` > 0): the batch's sequences run packed padding-free
        # (`_packed_hidden`, `pack_sequences`: positions restarting per sequence). With flash-attn, or sdpa (the
        # decoder is switched to `varlen_sdpa_attention`: sdpa per sequence), the micro-batch is one row with no
        # padding and no mask; another attention gets a few rows with transformers' block-diagonal mask. It
        # replaces `share_prefix` when both are on (a packed row holds each sequence whole, its prompt
        # included); `dedupe_images` still applies.
        self.pack = False

    def dummy_vision(self) -> torch.Tensor:
        vc = self.model.config.vision_config
        side = vc.spatial_merge_size  # one merged token: a (merge x merge) grid of patches
        dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
        param = next(self.model.model.visual.parameters())
        pixels = torch.zeros(side * side, dim, device=param.device, dtype=param.dtype)
        grid = torch.tensor([[1, side, side]], device=param.device)
        out = self.model.model.visual(pixels, grid_thw=grid)
        out = out.pooler_output if hasattr(out, "pooler_output") else out
        return out.float().sum() * 0.0

    def _shared_prefix_hidden(
        self, input_ids, attention_mask, sel, pixel_values, image_grid_thw
    ) -> torch.Tensor:
        """The hidden states that predict the `sel` tokens (row-major), computed with every distinct prompt once.

        A row's prompt is everything before its first target token. The distinct prompts run left-padded through
        the decoder (and their images through the tower) with a KV cache; the cache is gathered to the rows
        (autograd carries the gradient of every row back to its shared prompt), and the rows' completions run
        on it, at positions that continue each prompt's M-RoPE positions, as in the full sequence. The same two
        decoder passes run on every call, so FSDP ranks stay in step. Needs the decoder's cache, which HF turns
        off under gradient checkpointing: the caller falls back to the plain path there."""
        cfg, dev = self.model.config, input_ids.device
        b = input_ids.shape[0]
        lengths = attention_mask.sum(-1)
        start = torch.where(sel.any(-1), sel.float().argmax(-1), lengths).tolist()
        lengths, ids_list = lengths.tolist(), input_ids.tolist()
        per_row = (input_ids == cfg.vision_start_token_id).sum(-1).tolist()  # a row's images are consecutive
        first = [sum(per_row[:r]) for r in range(b)]
        # Rows share a prefix when their prompt tokens AND their images are the same: <|image_pad|> is one id
        # for every image, so two questions with the same text and image size have identical ids.
        image_of = distinct_images(pixel_values, image_grid_thw)[1] if pixel_values is not None else []
        groups: dict[tuple, int] = {}
        group_of, reps = [], []
        for r in range(b):
            key = (tuple(ids_list[r][: start[r]]), tuple(image_of[first[r] : first[r] + per_row[r]]))
            g = groups.setdefault(key, len(groups))
            if g == len(reps):
                reps.append(r)
            group_of.append(g)
        pv = grid = None
        if pixel_values is not None:  # the representatives' images
            keep = [i for r in reps for i in range(first[r], first[r] + per_row[r])]
            if keep:
                blocks = pixel_values.split(image_grid_thw.prod(-1).tolist())
                pv, grid = torch.cat([blocks[i] for i in keep]), image_grid_thw[keep]
        width = max(1, max(start[r] for r in reps))
        pad = cfg.text_config.pad_token_id if cfg.text_config.pad_token_id is not None else 0
        ids_p = torch.full((len(reps), width), pad, dtype=torch.long, device=dev)
        mask_p = torch.zeros_like(ids_p)
        for i, r in enumerate(reps):
            ids_p[i, width - start[r] :] = input_ids[r, : start[r]]
            mask_p[i, width - start[r] :] = 1
        mm_p = (ids_p == cfg.image_token_id).int()
        pos_p = position_ids_for(self.model, ids_p, mask_p, grid, mm_p)
        next_pos = pos_p.masked_fill(mask_p[None] == 0, -1).amax(dim=(0, 2)) + 1
        common = dict(attention_mask=mask_p, position_ids=pos_p, mm_token_type_ids=mm_p, use_cache=True)
        out = self._decoder(ids_p, pv, grid, **common)
        cache = output_cache(out)
        idx = torch.tensor(group_of, device=dev)
        h_first = out.last_hidden_state[:, -1][idx]  # (B, H): predicts each row's first completion token
        cache.batch_select_indices(idx)
        clen = [lengths[r] - start[r] for r in range(b)]
        wc = max(1, max(clen))
        ids_c = torch.full((b, wc), pad, dtype=torch.long, device=dev)
        mask_c = torch.zeros_like(ids_c)
        sel_c = torch.zeros(b, wc, dtype=torch.bool, device=dev)
        for r in range(b):
            ids_c[r, : clen[r]] = input_ids[r, start[r] : lengths[r]]
            mask_c[r, : clen[r]] = 1
            sel_c[r, : clen[r]] = sel[r, start[r] : lengths[r]]
        pos_c = (next_pos[idx][:, None] + torch.arange(wc, device=dev)).unsqueeze(0).expand(3, b, wc)
        kw = {"position_ids": pos_c, "use_cache": True, cache_kwarg(self.model): cache}
        out = self.model.model(input_ids=ids_c, attention_mask=torch.cat([mask_p[idx], mask_c], 1), **kw)
        # h_pred[:, j] predicts ids_c[:, j]
        h_pred = torch.cat([h_first[:, None], out.last_hidden_state[:, :-1]], 1)
        return h_pred[sel_c]

    def _packed_hidden(
        self, input_ids, attention_mask, sel, mm_token_type_ids, pixel_values, image_grid_thw
    ) -> torch.Tensor:
        """The hidden states that predict the `sel` tokens (row-major), with the batch packed padding-free.

        With varlen attention (flash-attn's, or `varlen_sdpa_attention`, which an sdpa decoder is switched to:
        `use_varlen_attention`) the whole batch is one row with no padding and no mask: attention runs sequence by
        sequence, costing sum(len_i^2). Otherwise (an attention that computes all W x W scores of a row, e.g.
        eager) the sequences go first-fit decreasing into a few rows about as wide as the longest sequence
        (data.pack_rows) with a block-diagonal mask, so a row's attention costs about what a padded row's does.
        The M-RoPE positions are computed on the padded batch, per row, exactly as the plain path does; each
        sequence's images move with it (pixel_values sliced by image_grid_thw, in the packed order)."""
        import data as D

        cfg = self.model.config
        position_ids = position_ids_for(
            self.model, input_ids, attention_mask, image_grid_thw, mm_token_type_ids
        )
        lengths = attention_mask.sum(-1).tolist()
        varlen = use_varlen_attention(self.model)
        rows = D.pack_rows(lengths, None if varlen else D.MAX_WIDEN)
        pad = cfg.text_config.pad_token_id if cfg.text_config.pad_token_id is not None else 0
        ids, pos, where = pack_sequences(input_ids, attention_mask, position_ids, rows, pad)
        mm = (ids == cfg.image_token_id).int()  # image slots, as the collate functions mark them
        pv = grid = None
        if pixel_values is not None:  # images in the packed order of their sequences
            # a sequence's images are consecutive
            per_seq = (input_ids == cfg.vision_start_token_id).sum(-1).tolist()
            blocks = D.slice_pixel_values(pixel_values, image_grid_thw, per_seq)
            first = [sum(per_seq[:b]) for b in range(len(per_seq))]
            order = [b for row in rows for b in row]
            pv = torch.cat([blocks[b] for b in order])
            grid = image_grid_thw[[i for b in order for i in range(first[b], first[b] + per_seq[b])]]
        # varlen: no mask built (NO_MASK); else None, and transformers builds the block-diagonal mask from pos[0]
        mask = NO_MASK if varlen else None
        out = self._decoder(
            ids, pv, grid, attention_mask=mask, position_ids=pos, mm_token_type_ids=mm, use_cache=False
        )
        hidden = out.last_hidden_state.flatten(0, 1)  # (R * W, H)
        # Token (b, t) is predicted by the hidden state of token (b, t - 1), wherever that landed in the rows.
        return hidden[where[:, :-1][sel[:, 1:]]]

    def _decoder(self, ids: torch.Tensor, pixels: torch.Tensor | None, grid: torch.Tensor | None, **kwargs):
        """The text model's output on token ids `ids` with their images (`pixels`, `grid`; None: no image). With
        `dedupe_images`, a batch's repeated images (a group's n samples repeat their prompt's) go through the
        vision tower once."""
        unique = dedupe_images(pixels, grid) if pixels is not None and self.dedupe_images else None
        if unique is None:
            return self.model.model(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, **kwargs)
        return self.model.model(inputs_embeds=self.embeds_with_images(ids, *unique), **kwargs)

    def embeds_with_images(self, input_ids, pixel_values, image_grid_thw, inverse) -> torch.Tensor:
        """Token embeddings with every image's features in its <|image_pad|> slots; the tower runs on the distinct
        images (`pixel_values`, `image_grid_thw`) and image i of the batch gets distinct image `inverse[i]`'s
        features (autograd sums the gradient of a shared image over its uses)."""
        inner = self.model.model
        feats = inner.get_image_features(pixel_values.to(inner.visual.dtype), image_grid_thw).pooler_output
        feats = torch.cat([feats[j] for j in inverse])
        embeds = inner.get_input_embeddings()(input_ids)
        slots = (input_ids == self.model.config.image_token_id)[..., None].expand_as(embeds)
        if int(slots[..., 0].sum()) != feats.shape[0]:
            raise ValueError(f"{int(slots[..., 0].sum())} image tokens for {feats.shape[0]} image features")
        return embeds.masked_scatter(slots, feats.to(embeds.dtype))

    def forward(
        self,
        input_ids,
        attention_mask,
        target_mask,
        pixel_values=None,
        image_grid_thw=None,
        mm_token_type_ids=None,
        temperature: float = 1.0,
        with_entropy: bool = False,
    ):
        if mm_token_type_ids is None:
            mm_token_type_ids = (input_ids == self.model.config.image_token_id).int()
        has_images = pixel_values is not None and pixel_values.numel() > 0
        # The dummy tower runs first, where a real image would (before the decoder): FSDP2's all-gathers must
        # come in the same order on every rank.
        dummy = self.dummy_vision() if self.always_run_vision and not has_images else None
        # Position t-1 predicts token t: the hidden states that predict a target token, in row-major order.
        sel = target_mask.bool().clone()
        sel[:, 0] = False
        pv, grid = (pixel_values, image_grid_thw) if has_images else (None, None)
        if self.pack:
            h_sel = self._packed_hidden(input_ids, attention_mask, sel, mm_token_type_ids, pv, grid)
        elif self.share_prefix and not is_gradient_checkpointing(self.model):
            h_sel = self._shared_prefix_hidden(input_ids, attention_mask, sel, pv, grid)
        else:
            position_ids = position_ids_for(self.model, input_ids, attention_mask, grid, mm_token_type_ids)
            common = dict(attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
            out = self._decoder(input_ids, pv, grid, mm_token_type_ids=mm_token_type_ids, **common)
            hidden = out.last_hidden_state  # (B, T, H), after the final norm
            h_sel = hidden[torch.roll(sel, shifts=-1, dims=1)]  # src[b, t-1] = sel[b, t]
        logp_sel, ent_sel = token_logprobs(
            h_sel, self.model.lm_head.weight, input_ids[sel], temperature, self.chunk_size, with_entropy
        )
        logp = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
        entropy = torch.zeros_like(logp)
        logp = logp.masked_scatter(sel, logp_sel)
        entropy = entropy.masked_scatter(sel, ent_sel)
        if dummy is not None:
            logp = logp + dummy
        return logp, entropy


def distinct_images(pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> tuple[list[int], list[int]]:
    """(keep, inverse) over a batch's images: `keep` the first occurrence of each distinct image, and image i of
    the batch is distinct image inverse[i]. Images compare by grid and exact pixel values (a cheap fingerprint
    first, then `torch.equal`)."""
    rows = image_grid_thw.prod(-1).tolist()
    blocks = pixel_values.split(rows)
    sums = torch.stack([b.sum(dtype=torch.float64) for b in blocks]).tolist() if blocks else []
    first: dict[tuple, list[int]] = {}
    keep, inverse = [], []
    for i, (grid, total) in enumerate(zip(image_grid_thw.tolist(), sums)):
        bucket = first.setdefault((tuple(grid), total), [])
        match = next((j for j in bucket if torch.equal(blocks[keep[j]], blocks[i])), None)
        if match is None:
            match = len(keep)
            keep.append(i)
            bucket.append(match)
        inverse.append(match)
    return keep, inverse


def dedupe_images(
    pixel_values: torch.Tensor, image_grid_thw: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, list[int]] | None:
    """A batch's images without repeats: (pixel_values, image_grid_thw, inverse) of the distinct images, where
    image i of the batch is distinct image inverse[i]; None when every image is distinct."""
    if len(image_grid_thw) < 2:
        return None
    keep, inverse = distinct_images(pixel_values, image_grid_thw)
    if len(keep) == len(inverse):
        return None
    blocks = pixel_values.split(image_grid_thw.prod(-1).tolist())
    return torch.cat([blocks[i] for i in keep]), image_grid_thw[keep], inverse
