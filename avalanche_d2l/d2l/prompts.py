"""Where a dream class's prompt starts, and the dreams that need no dreamer.

A learned class ``c`` gets its prompt ``p_c`` once, when it first dreams (later phases refine the
prompt kept in the plugin's inventory):

* Stable Diffusion, when the benchmark knows ``c``'s name: the text encoder's embedding of
  ``name_template.format(name)``;
* otherwise textual inversion on ``c``'s buffer images: the dreamer's concept (a row of the
  glyph dreamer's concept table, or an encoded caption) with the lowest denoising loss on those
  images (at most ``invert_choice_images`` of them), then ``invert_steps`` Adam steps on that
  loss (:meth:`Dreamer.denoising_loss`);
* ``prompts="random"`` (a control) or an unanchored dream: a random mix of the dreamer's concepts
  (:meth:`Dreamer.random_prompt`).

The controls that need no dreamer (``source="noise"`` / ``"interpolation"``) are made here too
(:func:`control_dreams`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import DreamConfig
from .jobs import DreamJob, DreamSet

__all__ = ["control_dreams", "initial_prompt", "interpolation_images", "noise_images"]


#: Images per denoiser call when choosing the starting concept. Measured on the offline dreamer
#: (104 concepts, 1 CPU thread): with 2 images per class, 64 per call takes 0.9 s against 3.1 s
#: one concept per call; with 8, 3.5 s against 4.3 s; with 20, 8.6 s against 9.4 s; 256 per
#: call was slower than 64 from 8 images up, and with 50 images (one concept per call) 25 s
#: against 21 s.
_CHOICE_IMAGES = 64


def _invert(dreamer, anchors: Tensor, config: DreamConfig, g: torch.Generator) -> Tensor:
    """Textual inversion of ``anchors`` (learner-space images of one class)."""
    x0 = dreamer.encode(anchors)
    concepts = dreamer.concept_embeddings().detach().float()
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
    xs = x0[: config.invert_choice_images or x0.shape[0]]
    # the same images, timesteps and noise for every concept; several concepts per denoiser call
    # when the class has few images (at most a generation batch, sized to the memory, and at most
    # _CHOICE_IMAGES images per call)
    per_call = max(1, min(config.generate_batch_size, _CHOICE_IMAGES) // xs.shape[0])
    scores = []
    with torch.no_grad():
        for chunk in concepts.split(per_call):
            cond = chunk.repeat_interleave(xs.shape[0], dim=0)  # prompt-major: r * n rows
            g_choice = torch.Generator().manual_seed(seed)
            loss = dreamer.denoising_loss(xs, cond, generator=g_choice, repeats=chunk.shape[0])
            scores.append(loss.view(chunk.shape[0], xs.shape[0]).mean(1))
    prompt = torch.nn.Parameter(concepts[int(torch.cat(scores).argmin())].clone())
    if config.invert_steps > 0:
        opt = torch.optim.Adam([prompt], lr=config.invert_lr)
        with torch.enable_grad():
            for _ in range(config.invert_steps):
                cond = prompt.unsqueeze(0).expand(x0.shape[0], -1, -1)
                loss = dreamer.denoising_loss(x0, cond, generator=g).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return prompt.detach().float().cpu()


def initial_prompt(
    dreamer,
    *,
    anchors: Tensor | None,
    name: str | None,
    config: DreamConfig,
    generator: torch.Generator,
) -> tuple[Tensor, str]:
    """``(p, how)``: the first prompt ``(L, D)`` of a dream class and how it was made."""
    if config.prompts == "random" or anchors is None or anchors.shape[0] == 0:
        return dreamer.random_prompt(1, generator=generator)[0].float().cpu(), "random"
    if name is not None and getattr(dreamer, "text_encoder", None) is not None:
        return dreamer.encode_text([config.name_template.format(name)])[0].float().cpu(), "name"
    return _invert(dreamer, anchors, config, generator), "inversion"


def interpolation_images(
    first: Tensor, second: Tensor, n: int, generator: torch.Generator, space
) -> Tensor:
    """``n`` mixes ``lam * a + (1 - lam) * b`` (``lam`` in [0.35, 0.65], in [0, 1] image space)
    of random images ``a`` of ``first`` and ``b`` of ``second`` (learner-space batches)."""
    a = space.to_unit(first[torch.randint(0, first.shape[0], (n,), generator=generator)])
    b = space.to_unit(second[torch.randint(0, second.shape[0], (n,), generator=generator)])
    lam = 0.35 + 0.3 * torch.rand(n, 1, 1, 1, generator=generator)
    return space.from_unit(lam * a + (1 - lam) * b)


def noise_images(n: int, generator: torch.Generator, space) -> Tensor:
    """``n`` uniform-noise images in the learner's space (a control)."""
    return space.from_unit(torch.rand((n, *space.shape), generator=generator))


def control_dreams(jobs: list[DreamJob], config: DreamConfig, space, seed: int) -> DreamSet:
    """The dream set of a control without a dreamer: ``samples_per_class`` images per job, uniform
    noise (``source="noise"``) or interpolations of the job's buffer images with the next job's
    (another seen class when there is one), labelled with the job's head."""
    g = torch.Generator().manual_seed(seed * 31 + 5)
    n, images = config.samples_per_class, []
    for i, job in enumerate(jobs):
        if config.source == "noise":
            images.append(noise_images(n, g, space))
        else:
            other = jobs[(i + 1) % len(jobs)].anchors if len(jobs) > 1 else job.anchors
            images.append(interpolation_images(job.anchors, other, n, g, space))
    heads = torch.tensor([j.head for j in jobs], dtype=torch.long)
    return DreamSet(
        heads,
        torch.empty(len(jobs), 0),
        torch.cat(images),
        heads.repeat_interleave(n),
        {"steps": 0},
    )
