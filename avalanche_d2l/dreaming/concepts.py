"""The dreamer's prompt space: text encoding (latent kind), the concepts it knows (the glyph
dreamer's learned table, or CLIP embeddings of captions) and random prompts near them.
:class:`DreamerPrompts` holds them as methods of the
:class:`~avalanche_d2l.dreaming.dreamer.Dreamer` (mixed into it)."""

from __future__ import annotations

import torch
from torch import Tensor

from .config import DEFAULT_SD_CAPTIONS

__all__ = ["DreamerPrompts"]


class DreamerPrompts:
    """The prompt space of :class:`~avalanche_d2l.dreaming.dreamer.Dreamer` (mixed into it)."""

    def encode_text(self, prompts: list[str]) -> Tensor:
        """CLIP-encode captions to ``(len(prompts), L, D)`` prompt embeddings (latent kind only)."""
        if self.text_encoder is None or self.tokenizer is None:
            raise RuntimeError(
                f"encode_text needs a text encoder and tokenizer; this {self.config.kind!r} "
                "dreamer has none. The pixel (glyph) dreamer's prompt space is its concept table: "
                "use concept_embeddings() or random_prompt()."
            )
        if isinstance(prompts, str):
            prompts = [prompts]
        tok = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.config.prompt_len,
            truncation=True,
            return_tensors="pt",
        )
        dev = next(self.text_encoder.parameters()).device
        with torch.no_grad():
            out = self.text_encoder(tok.input_ids.to(dev), return_dict=False)[0]
        return out.float().to(self.device)

    def concept_embeddings(self) -> Tensor:
        """``(K, L, D)`` embeddings of the concepts the dreamer knows.

        Pixel kind: its learned concept table (one row per glyph). Latent kind: CLIP embeddings of
        ``config.concept_captions`` (default :data:`DEFAULT_SD_CAPTIONS`), computed once.
        """
        if self.concept_table is not None:
            return self.concept_table
        if self._text_concepts is None:
            if self.text_encoder is None:
                raise RuntimeError(
                    "this dreamer has neither a concept table nor a text encoder, so it knows no "
                    "concepts; load a checkpoint with a text_encoder/tokenizer or pass "
                    "concept_table=..."
                )
            captions = self.config.concept_captions or list(DEFAULT_SD_CAPTIONS)
            self._text_concepts = self.encode_text(captions)
        return self._text_concepts

    def random_prompt(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """``(n, L, D)`` random prompts near the concept-embedding distribution.

        Each prompt is a random convex mix of 2..``config.prompt_mix`` distinct concepts
        (Dirichlet(1) weights) plus Gaussian noise of ``config.prompt_noise`` times the
        per-dimension std of the concepts. Drawn on the CPU when the generator is a CPU one.
        """
        table = self.concept_embeddings().float()
        K = table.shape[0]
        gdev = generator.device if generator is not None else table.device
        m_max = max(1, min(int(self.config.prompt_mix), K))
        m_min = min(2, m_max)
        n_mix = torch.randint(m_min, m_max + 1, (n,), generator=generator, device=gdev)
        scores = torch.rand(n, K, generator=generator, device=gdev)
        # m distinct concepts per row: the m largest of K uniform scores
        rank = scores.argsort(dim=1, descending=True).argsort(dim=1)
        chosen = rank < n_mix[:, None]
        w = -torch.log(torch.rand(n, K, generator=generator, device=gdev).clamp_min(1e-12))
        w = (w * chosen).float()
        w = w / w.sum(1, keepdim=True)
        noise = torch.randn(n, *table.shape[1:], generator=generator, device=gdev)
        w, noise = w.to(table.device), noise.to(table.device)
        mix = torch.einsum("nk,kld->nld", w, table)
        std = table.std(0, keepdim=True) if K > 1 else table.abs().mean().expand_as(table[:1])
        return (mix + self.config.prompt_noise * std * noise).detach()
