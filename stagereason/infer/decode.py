"""A lean batched decoding loop over a shared prefix cache (what stage search spends its time in).

``model.generate`` pays, at every step, for input preparation, attention and
cross-attention mask building, a logits-processor list and a stop-string
matcher over the whole vocabulary built anew for each call. Here one step is
the text decoder and ``lm_head`` on one token per row: the Mllama
cross-attention mask of a decoding step is built once per call (every new
token sees the image the way the prompt's last token did), positions are
shared (no row is padded: they all continue one prefix), rows that finish leave
the batch, and the stop check decodes only the last few tokens of a row.
Sampling uses transformers' own temperature/top-k/top-p warpers in the order
``generate`` applies them, so a seeded single row draws what ``generate`` draws.
"""

from __future__ import annotations

import copy
import inspect
import weakref

import torch

__all__ = ["Stepper", "cache_kwarg", "crop_cache", "cross_layers", "decode", "drop_unapplied_processing",
           "fork_cache", "mllama_parts", "output_cache"]


def cache_kwarg(model) -> str:
    """The name under which ``model``'s forward takes the key/value cache: ``cache`` from transformers 5.25 on
    (where ``past_key_values`` is a deprecated alias, to be removed), ``past_key_values`` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel passes it on
    cls = type(base)
    if cls not in _CACHE_KWARG:
        try:
            params = inspect.signature(base.forward).parameters
        except (TypeError, ValueError):
            params = {}
        _CACHE_KWARG[cls] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_KWARG[cls]


_CACHE_KWARG: dict[type, str] = {}


def output_cache(out):
    """The key/value cache a forward returned (``cache`` from transformers 5.25 on, ``past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def mllama_parts(model):
    """``(MllamaModel, lm_head)`` of an Mllama model, PEFT-wrapped or not; ``(None, None)`` for other models."""
    peft_inner = getattr(getattr(model, "base_model", None), "model", None)
    for top in (model, peft_inner):
        inner = getattr(top, "model", None) if top is not None else None
        if inner is not None and all(hasattr(inner, a) for a in ("language_model", "vision_model",
                                                                    "multi_modal_projector")):
            return inner, top.lm_head
    return None, None


def _with_layers(cache, kv):
    """A shallow copy of a dynamic ``cache`` whose filled layers hold ``kv(i, keys, values)``."""
    new = copy.copy(cache)
    new.layers = []
    for i, layer in enumerate(cache.layers):
        dup = copy.copy(layer)
        if getattr(layer, "keys", None) is not None:
            dup.keys, dup.values = kv(i, layer.keys, layer.values)
        new.layers.append(dup)
    return new


def fork_cache(cache, n: int):
    """A cache for ``n`` rows continuing ``cache``; ``cache`` itself is left as it is.

    The layers' tensors are repeated (new tensors) or, for one row, shared:
    appending to a dynamic layer concatenates into a new tensor and never
    writes into the old one.

    Raises:
        TypeError: a cache other than ``DynamicCache`` (written in place; crops and row copies assume
            dynamic layers).
    """
    from transformers import DynamicCache

    if not isinstance(cache, DynamicCache):
        raise TypeError(f"staged decoding needs a DynamicCache, got {type(cache).__name__}")
    if n == 1:
        return _with_layers(cache, lambda i, k, v: (k, v))
    return _with_layers(cache, lambda i, k, v: (k.repeat_interleave(n, dim=0), v.repeat_interleave(n, dim=0)))


def crop_cache(cache, length: int, keep: set[int]):
    """A copy of ``cache`` holding only its first ``length`` positions; layers in ``keep`` (Mllama's image
    keys/values in cross-attention layers) are kept whole. ``cache`` itself is left as it is."""
    return _with_layers(cache, lambda i, k, v: (k, v) if i in keep else (k[..., :length, :], v[..., :length, :]))


def _row_of(cache, b: int, copy_out: bool, prefix, shared: set[int]):
    """Row ``b`` of a batch cache as a one-row cache: copied while the batch goes on (a view would keep the
    whole batch's tensors alive), a view once the batch is done. Layers in ``shared`` (the image keys/values,
    the same in every row and never appended to) are the one-row ``prefix`` cache's own tensors, not copies."""
    def row(i, k, v):
        if i in shared:
            return prefix.layers[i].keys, prefix.layers[i].values
        return (k[b:b + 1].clone(), v[b:b + 1].clone()) if copy_out else (k[b:b + 1], v[b:b + 1])

    return _with_layers(cache, row)


def cross_layers(model) -> set[int]:
    """Indices of Mllama's cross-attention layers (empty for other models)."""
    mllama, _ = mllama_parts(model)
    return set() if mllama is None else set(mllama.language_model.cross_attention_layers)


# model -> {with an image: whether its lean step checked out}: a text-only step skips the cross-attention
# layers, so it says nothing about them
_LEAN_OK: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class Stepper:
    """One forward step for a batch of rows that continue the same cache.

    For Mllama the step runs the text decoder's layers directly (the same
    modules, so LoRA and 4-bit layers work unchanged) with the one-token
    cross-attention mask prepared once, skipping the per-call wrappers,
    mask building and output plumbing of the model's ``forward``; the first
    step of each model is computed both ways and compared, and the model's
    own ``forward`` is used if they disagree. Any other model is called whole.
    """

    def __init__(self, model, step_xmask: torch.Tensor | None):
        self.model = model
        self.mllama, self.lm_head = mllama_parts(model)
        self.xmask = self.full_row = None
        if self.mllama is not None and step_xmask is not None:
            from transformers.models.mllama.modeling_mllama import _prepare_cross_attention_mask

            self.xmask, self.full_row = _prepare_cross_attention_mask(
                step_xmask, num_vision_tokens=self.mllama.vision_model.num_patches, dtype=self.mllama.dtype)
        self._kind = self.xmask is not None
        self.lean = (self.mllama is not None and _LEAN_OK.get(model, {}).get(self._kind, True)
                     and _lean_layers(self.mllama))

    def __call__(self, ids: torch.Tensor, cache, position: int) -> torch.Tensor:
        """Float32 next-token logits ``(batch, vocab)`` for ``ids`` ``(batch, 1)`` at ``position``."""
        if not self.lean:
            return self._forward(ids, cache, position)
        if self._kind not in _LEAN_OK.setdefault(self.model, {}):
            check = fork_cache(cache, 1)
            ref = self._forward(ids, check, position)
            out = self._lean(ids, cache, position)
            eps = torch.finfo(self.mllama.dtype).eps
            ok = (out.shape == ref.shape and bool((out - ref).abs().max() <= 64 * eps * (1 + ref.abs().max()))
                  and torch.equal(out.argmax(-1), ref.argmax(-1)))  # the tolerance alone is loose in bf16
            _LEAN_OK[self.model][self._kind] = ok
            if not ok:
                import logging

                logging.getLogger(__name__).warning("the lean decoding step disagrees with %s.forward; using "
                                                    "forward", type(self.model).__name__)
                self.lean = False
                return ref
            return out
        return self._lean(ids, cache, position)

    def _forward(self, ids, cache, position):
        b = ids.shape[0]
        pos = torch.tensor([[position]], device=ids.device)
        if self.mllama is None:  # a text-only model: no cross-attention mask to pass
            out = self.model(input_ids=ids, position_ids=pos.expand(b, -1), use_cache=True, logits_to_keep=1,
                             **{cache_kwarg(self.model): cache})
            return out.logits[:, -1].float()
        kwargs = {}
        if self.xmask is not None:
            kwargs = {"cross_attention_mask": self.xmask.expand(b, -1, -1, -1),
                      "full_text_row_masked_out_mask": self.full_row.expand(b, -1, -1, -1)}
        lm = self.mllama.language_model
        hidden = lm(input_ids=ids, position_ids=pos, use_cache=True, **{cache_kwarg(lm): cache}, **kwargs
                    ).last_hidden_state
        return self.lm_head(hidden[:, -1]).float()

    def _lean(self, ids, cache, position):
        """Mllama's text decoder for one token per row, written out (mirrors ``MllamaTextModel.forward``)."""
        from transformers.models.mllama.modeling_mllama import apply_rotary_pos_emb

        lm, b = self.mllama.language_model, ids.shape[0]
        h = lm.embed_tokens(ids)
        cos, sin = lm.rotary_emb(h, torch.tensor([[position]], device=ids.device))
        for idx, layer in enumerate(lm.layers):
            if idx in lm.cross_attention_layers:
                cached = cache.layers[idx] if idx < len(cache.layers) else None
                if cached is None or getattr(cached, "keys", None) is None:
                    continue  # no image in this prompt: the model skips the layer too
                att = layer.cross_attn
                q = att.q_proj(layer.input_layernorm(h)).view(b, 1, -1, att.head_dim).transpose(1, 2)
                mask = None if self.xmask is None else self.xmask.expand(b, -1, -1, -1)
                a = _attend(att.q_norm(q), cached.keys, cached.values, mask, att.scaling)
                h = h + layer.cross_attn_attn_gate.tanh() * att.o_proj(a.transpose(1, 2).reshape(b, 1, -1))
                x = layer.mlp(layer.post_attention_layernorm(h))
                if self.full_row is not None:
                    x = self.full_row[:, 0] * x
                h = h + layer.cross_attn_mlp_gate.tanh() * x
            else:
                att = layer.self_attn
                x = layer.input_layernorm(h)
                q = att.q_proj(x).view(b, 1, -1, att.head_dim).transpose(1, 2)
                k = att.k_proj(x).view(b, 1, -1, att.head_dim).transpose(1, 2)
                v = att.v_proj(x).view(b, 1, -1, att.head_dim).transpose(1, 2)
                q, k = apply_rotary_pos_emb(q, k, cos, sin)
                k, v = cache.update(k, v, idx)
                h = h + att.o_proj(_attend(q, k, v, None, att.scaling).transpose(1, 2).reshape(b, 1, -1))
                h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.lm_head(lm.norm(h)[:, -1]).float()


def _lean_layers(mllama) -> bool:
    """Whether the text decoder is made of the layers ``Stepper._lean`` writes out."""
    names = {type(layer).__name__ for layer in mllama.language_model.layers}
    return names <= {"MllamaSelfAttentionDecoderLayer", "MllamaCrossAttentionDecoderLayer"}


_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)  # sdpa's enable_gqa


def _attend(q, k, v, mask, scale):
    """Attention of one query per row over cached keys; grouped key/value heads are shared, not copied."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if q.shape[1] == k.shape[1]:
        return sdpa(q, k, v, attn_mask=mask, scale=scale)
    if _GQA:
        return sdpa(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    groups = q.shape[1] // k.shape[1]
    return sdpa(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), attn_mask=mask, scale=scale)


# generation_config settings that ``generate`` turns into logits processors and ``decode`` does not apply
_UNAPPLIED = ("repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size",
              "encoder_no_repeat_ngram_size", "bad_words_ids", "min_length", "min_new_tokens", "min_p", "typical_p",
              "epsilon_cutoff", "eta_cutoff", "suppress_tokens", "begin_suppress_tokens", "sequence_bias",
              "forced_bos_token_id", "forced_eos_token_id", "exponential_decay_length_penalty", "guidance_scale")


def drop_unapplied_processing(model) -> dict:
    """Reset the ``generation_config`` settings :func:`decode` does not apply; return what they were.

    Stage search decodes with temperature, top-k and top-p only; batched greedy
    answers go through ``generate``. Resetting the rest keeps both paths giving
    the same answers instead of ``generate`` alone applying, say, a repetition penalty.
    """
    from transformers import GenerationConfig

    config, default = getattr(model, "generation_config", None), GenerationConfig()
    dropped = {}
    for name in _UNAPPLIED if config is not None else ():
        value = getattr(config, name, None)
        if value != getattr(default, name, None):
            dropped[name] = value
            setattr(config, name, getattr(default, name, None))
    return dropped


def _warpers(model, temperature: float, top_p: float):
    """transformers' sampling warpers, in ``generate``'s order (its top-k default of 50 included)."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    top_k = getattr(model.generation_config, "top_k", None)
    top_k = 50 if top_k is None else top_k
    warpers = []  # called one by one: LogitsProcessorList inspects each one's signature at every step
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k=top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=top_p))
    return warpers


class _StopCheck:
    """Whether a row's text holds any stop string, decoding only its last few tokens.

    Every character of a stop string comes from a token that decodes to at
    least one character, so a window of as many tokens as the longest stop
    has characters sees any stop the moment it completes.
    """

    def __init__(self, tok, stops: list[str]):
        self.tok, self.stops = tok, stops
        self.window = max((len(s) for s in stops), default=0) + 1

    def __call__(self, row: list[int]) -> bool:
        if not self.stops:
            return False
        text = self.tok.decode(row[-self.window:], skip_special_tokens=False)
        return any(s in text for s in self.stops)


@torch.no_grad()
def decode(model, tok, cache, last_id: int, position: int, n: int, max_new_tokens: int, *,
           step_xmask: torch.Tensor | None = None, stops: list[str] | None = None, eos: set[int] = frozenset(),
           do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
           scores: bool = False):
    """``n`` continuations of a prefix whose cache holds all but its last token.

    Args:
        cache: the prefix's cache (left unchanged; the rows get their own).
        last_id: the prefix's last token (fed first); ``position`` its position.
        step_xmask: Mllama's cross-attention mask for one new token, ``(1, 1, images, tiles)``.
        stops: a row ends at the token that completes any of these (that token kept).
        eos: end-of-turn ids; a row ends before them.
        scores: also return each row's mean log-probability of its tokens under the
            model's raw distribution.

    Returns:
        ``(rows, means, caches)``: each row's new token ids, the means (None unless
        ``scores``) and each row's own cache as it was when the row ended (a copy of
        its row: it holds the prefix and the row's tokens, the last one or, after an
        end-of-turn, none of them left out).
    """
    device = model.device
    batch = fork_cache(cache, n)
    shared = cross_layers(model)
    step = Stepper(model, step_xmask)
    warpers = _warpers(model, temperature, top_p) if do_sample else None
    stop_check = _StopCheck(tok, list(stops or []))
    rows: list[list[int]] = [[] for _ in range(n)]
    logp_sum = [0.0] * n
    saved: list = [None] * n
    alive = list(range(n))  # call rows still in the batch, in batch order
    ids = torch.full((n, 1), last_id, dtype=torch.long, device=device)
    for i in range(max_new_tokens):
        logits = step(ids, batch, position + i)
        if do_sample:
            warped = logits
            for warp in warpers:
                warped = warp(None, warped)
            nxt = torch.multinomial(warped.softmax(-1), num_samples=1).squeeze(1)
        else:
            nxt = logits.argmax(-1)
        if scores:
            picked = logits.log_softmax(-1).gather(-1, nxt[:, None]).squeeze(-1).tolist()
        keep, ended = [], []
        for b, (r, t) in enumerate(zip(alive, nxt.tolist(), strict=True)):
            if t in eos:
                done = True
            else:
                rows[r].append(t)
                if scores:
                    logp_sum[r] += picked[b]
                done = stop_check(rows[r]) or i + 1 == max_new_tokens
            (ended if done else keep).append(b)
        for b in ended:
            saved[alive[b]] = _row_of(batch, b, bool(keep), cache, shared)
        if not keep:
            break
        if len(keep) < len(alive):
            idx = torch.tensor(keep, device=device)
            batch.batch_select_indices(idx)
            nxt = nxt.index_select(0, idx)
            alive = [alive[b] for b in keep]
        ids = nxt[:, None]
    means = [logp_sum[r] / max(len(rows[r]), 1) for r in range(n)] if scores else None
    return rows, means, saved

