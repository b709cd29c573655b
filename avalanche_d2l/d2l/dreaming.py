"""The dreaming loop: grow dream classes from learned classes through the frozen dreamer.

Each dream class (a :class:`DreamJob`) grows from a learned class ``c``: its prompt ``p_c``
conditions the frozen dreamer, whose sampling starts from ``c``'s buffer images noised to
``strength`` (image-to-image; ``anchors`` empty: from pure noise). The learner judges the images
and its loss moves the prompt (truncated backprop through the last DDIM steps):

* ``target``: cross-entropy towards the dream's own free head -- the learner sees a class of its
  own;
* ``seen``: the learner's mass on the seen classes driven to ``seen_mass`` -- distinct from ``c``
  and from every class it has learned, yet at their boundary;
* ``distinct``: hinge on the cosine between the dream's mean feature and the other dreams'
  (detached, from the previous step) -- distinct from the other dreams;
* ``coherence``: hinge keeping the dream's mean feature within ``coherence_margin`` cosine of
  ``c``'s prototype -- it stays on the learned manifold, near where it grew from;
* ``norm``: the prompt's norm stays that of the dreamer's concepts.

A class stops when its stop rule says so (:mod:`avalanche_d2l.d2l.oracle`) or at the step cap.
Memory: the active classes go through the dreamer ``micro_batch`` images at a time and the
gradients accumulate, so the peak does not grow with the number of dream classes. Every class
draws its noise and anchors from its own generators, so results do not depend on the grouping,
and classes are sharded across processes (:mod:`avalanche_d2l.dreaming.accel`).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from ..dreaming import accel
from ..utils import training_mode
from .config import DreamConfig
from .jobs import DreamJob, DreamSet, direction
from .oracle import LearnedOracle, oracle_input, stop_label

__all__ = ["DreamJob", "DreamSet", "direction", "dream", "dream_loss"]


def dream_loss(
    logits, feats, *, target, n_seen, others, prototype, center, prompt, concept_norm, config
):
    """The loss terms of one dream class's batch (see the module docstring) and their sum."""
    p = logits.softmax(1)
    terms = {"target": F.cross_entropy(logits, torch.full_like(logits[:, 0], target).long())}
    if n_seen:
        p_seen = p[:, :n_seen].sum(1).clamp(1e-6, 1 - 1e-6)
        m = float(config.seen_mass)
        bce = -(1 - m) * torch.log1p(-p_seen)
        if m > 0:  # BCE towards m minus its minimum: 0 at p_seen = m
            bce = bce - m * torch.log(p_seen) + (m * math.log(m) + (1 - m) * math.log1p(-m))
        terms["seen"] = bce.mean()
    mean = direction(feats, center)
    if others is not None and others.numel():
        terms["distinct"] = F.relu(others.to(mean) @ mean - config.distinct_margin).mean()
    if prototype is not None:
        terms["coherence"] = F.relu(config.coherence_margin - mean @ prototype.to(mean))
    rel = prompt.flatten().norm() / max(concept_norm, 1e-12)
    terms["norm"] = (rel - 1.0) ** 2
    weights = {k: getattr(config, f"w_{k}") for k in terms}
    terms["loss"] = sum(weights[k] * v for k, v in terms.items())
    return terms


@contextmanager
def _frozen(model):
    """Eval mode and no parameter grads for the learner while it judges dreams."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with training_mode(model, False):
        model.requires_grad_(False)
        try:
            yield model
        finally:
            for n, p in model.named_parameters():
                p.requires_grad_(flags[n])


def _gen(seed: int, head: int, stream: int) -> torch.Generator:
    """A class's own CPU generator per purpose (0: optimisation, 1: dream set)."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(head)) * 4 + int(stream))


def _render(dreamer, prompts, job_anchors, gens, b, config, *, grad, steps):
    """Images of several classes (``b`` each): anchors (or nothing) + noise -> dreamer."""
    shape = (dreamer.config.latent_channels, dreamer.config.latent_size, dreamer.config.latent_size)
    noise, inits = [], []
    for anchors, g in zip(job_anchors, gens):
        noise.append(torch.randn((b, *shape), generator=g))
        if anchors.shape[0]:
            pick = torch.randint(0, anchors.shape[0], (b,), generator=g)
            inits.append(dreamer.encode(anchors[pick]))
    emb = prompts.repeat_interleave(b, dim=0)
    init = torch.cat(inits) if inits else None
    kw = {"init": init, "strength": config.strength} if init is not None else {}
    return dreamer.sample(
        emb,
        noise=torch.cat(noise),
        num_inference_steps=steps,
        grad=grad,
        backprop_steps=config.backprop_steps,
        **kw,
    )


def _judge(learner, images, visible):
    logits, feats = learner.forward_heads(images, return_features=True)
    return logits[:, visible].float(), feats.float()


def dream(
    *,
    dreamer,
    learner,
    jobs,
    seen_heads,
    config: DreamConfig,
    oracle: LearnedOracle,
    seed: int = 0,
    distributed: bool | None = None,
) -> DreamSet:
    """Optimise the prompts of ``jobs`` through ``dreamer`` under ``learner``'s loss, then
    generate the dream set (same in every process)."""
    world = accel.num_processes() if distributed in (None, True) else 1
    K, b = len(jobs), config.batch_per_class
    heads = [j.head for j in jobs]
    dev = next(learner.parameters()).device
    visible = torch.tensor([*seen_heads, *heads], device=dev)
    n_seen = len(seen_heads)
    concept_norm = float(dreamer.concept_embeddings().flatten(1).norm(dim=1).mean())
    # 1. this process's classes, their prompts as parameters, one Adam over them
    own = accel.shard(range(K)) if world > 1 else list(range(K))
    params = {i: torch.nn.Parameter(jobs[i].prompt.clone().float().to(dreamer.device)) for i in own}
    opt = torch.optim.Adam(list(params.values()), lr=config.lr) if params else None
    previous = {i: p.detach().clone() for i, p in params.items()}
    gens = {i: _gen(seed, heads[i], 0) for i in own}
    per_pass = max(1, int(config.micro_batch) // b) if config.micro_batch else max(1, K)
    cap = config.steps if config.optimises else 0
    active, means, last = list(range(K)), {}, {}
    stops: dict[int, dict[str, Any]] = {}
    hist: dict[str, Any] = {"terms": {}, "distinctness": [], "coherence": [], "active": []}
    t0 = time.perf_counter()
    with _frozen(learner):
        for step in range(cap + 1):
            report, grad = {}, step < cap
            mine = [i for i in active if i in params]
            for s in range(0, len(mine), per_pass):
                group = mine[s : s + per_pass]
                # 2. image-to-image from the buffer anchors under the prompts (graph: last steps)
                with torch.set_grad_enabled(grad):
                    images = _render(
                        dreamer,
                        torch.stack([params[i] for i in group]),
                        [jobs[i].anchors for i in group],
                        [gens[i] for i in group],
                        b,
                        config,
                        grad=grad,
                        steps=config.num_inference_steps,
                    )
                    logits, feats = _judge(learner, images.float().to(dev), visible)
                losses = []
                for n, i in enumerate(group):
                    rows = slice(n * b, (n + 1) * b)
                    # 3. the learner's measures: distinctness, coherence, the oracle's input
                    f = direction(feats[rows].detach(), jobs[i].center).cpu()
                    proto = jobs[i].prototype
                    d = float(logits[rows].detach().softmax(1)[:, n_seen + i].mean())
                    c = float(f @ proto.cpu()) if proto is not None else 0.0
                    report[i] = {"mean": f, "d": d, "c": c, "z": oracle_input(f, means.get(i))}
                    if grad:
                        others = [means[o] for o in sorted(means) if o != i]
                        terms = dream_loss(
                            logits[rows],
                            feats[rows],
                            target=n_seen + i,
                            n_seen=n_seen,
                            others=torch.stack(others) if others else None,
                            prototype=proto,
                            center=jobs[i].center,
                            prompt=params[i],
                            concept_norm=concept_norm,
                            config=config,
                        )
                        losses.append(terms["loss"])
                        report[i]["terms"] = {k: float(v.detach()) for k, v in terms.items()}
                if losses:
                    torch.stack(losses).sum().backward()
                del images, logits, feats, losses
            # 4. every process learns every class's measures
            merged = {}
            for part in accel.gather_object(report) if world > 1 else [report]:
                merged.update(part)
            # 5. label the previous step by the rule; decide who stops now
            cont = []
            for i in active:
                r, prev = merged[i], last.get(i)
                label = None
                if prev is not None:
                    label = stop_label(
                        prev["d"],
                        r["d"],
                        prev["c"],
                        r["c"],
                        rise=config.rule_rise,
                        drop=config.rule_drop,
                    )
                    if config.stop == "oracle":
                        oracle.add(prev["z"], label)
                why = ""
                if step >= config.min_steps and config.stop == "rule" and label:
                    why = "rule"  # the previous prompt was the stop point: go back to it
                    if i in params:
                        params[i].data.copy_(previous[i])
                elif step >= config.min_steps and config.stop == "oracle" and oracle.decide(r["z"]):
                    why = "oracle"
                elif step >= cap:
                    why = "step_cap"
                means[i], last[i] = r["mean"], r
                if why:
                    stops[heads[i]] = {"step": step, "reason": why, "distinctness": r["d"]}
                    if i in params:
                        params[i].grad = None
                else:
                    cont.append(i)
            if config.stop == "oracle":
                oracle.update()
            hist["distinctness"].append(sum(merged[i]["d"] for i in active) / len(active))
            hist["coherence"].append(sum(merged[i]["c"] for i in active) / len(active))
            hist["active"].append(len(active))
            if grad and cont:  # the mean of each loss term over the classes that continue
                for name in merged[cont[0]]["terms"]:
                    vals = [merged[i]["terms"].get(name, 0.0) for i in cont]
                    hist["terms"].setdefault(name, []).append(sum(vals) / len(vals))
            if not cont:
                break
            # 6. Adam step on the prompts that continue
            for i in cont:
                if i in params:
                    previous[i] = params[i].detach().clone()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
            active = cont
    optim_s = time.perf_counter() - t0
    # 7. the dream set: samples_per_class images per class, fresh noise, no graph
    out = {i: _generate(dreamer, params[i].detach(), jobs[i], config, seed) for i in own}
    merged_out: dict[int, Any] = {}
    for part in accel.gather_object(out) if world > 1 else [out]:
        merged_out.update(part)
    n = config.samples_per_class
    hist.update(
        micro_batch=min(per_pass, K) * b,
        stops=stops,
        optim_seconds=optim_s,
        processes=world,
        steps=len(hist["active"]) - 1,
        oracle=oracle.describe(),
    )
    return DreamSet(
        heads=torch.tensor(heads, dtype=torch.long),
        prompts=torch.stack([merged_out[i][0] for i in range(K)]),
        images=torch.cat([merged_out[i][1] for i in range(K)]),
        labels=torch.tensor(heads, dtype=torch.long).repeat_interleave(n),
        history=hist,
    )


@torch.no_grad()
def _generate(dreamer, prompt: Tensor, job: DreamJob, config: DreamConfig, seed: int):
    g, n, gb = _gen(seed, job.head, 1), config.samples_per_class, config.generate_batch_size
    chunks = []
    for s in range(0, n, gb):
        m = min(gb, n - s)
        chunks.append(
            _render(
                dreamer,
                prompt.unsqueeze(0),
                [job.anchors],
                [g],
                m,
                config,
                grad=False,
                steps=config.generate_inference_steps,
            )
            .float()
            .cpu()
        )
    return prompt.float().cpu(), torch.cat(chunks)
