"""Best-of-N at inference with DPO's implicit reward (RLAIF-V, CVPR'25 version): sample N answers from the aligned
policy and keep the one it prefers most over the reference model:

    r(y) = beta * (log pi(y | x) - log ref(y | x))      summed over the answer's tokens (and what closes its turn)

A DPO-trained policy is the reference reweighted by exp(r / beta), so r ranks answers the way the preference data
would; no separate reward model is needed, only the model the policy started from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mpm.align.batches import response_logps
from mpm.align.losses import sequence_logps
from mpm.core.images import open_image
from mpm.data import to_device
from mpm.inference import Request, generate, with_markers
from mpm.processor import MPMProcessor


@dataclass
class Candidate:
    answer: str
    reward: float  # beta * (log pi - log ref) of the answer


@torch.no_grad()
def answer_logps(model, processor: MPMProcessor, question: str, images: list, answers: list[str]) -> torch.Tensor:
    """(N,) summed log-probs of each answer to `question` about `images` under `model` (one batch)."""
    question = with_markers(processor, question, len(images))
    encoded = [
        processor.encode_conversation(
            [{"role": "user", "content": question}, {"role": "assistant", "content": answer}], images
        )
        for answer in answers
    ]
    batch = to_device(processor.collate(encoded), next(model.parameters()).device)
    logps, mask = response_logps(model, batch)
    return sequence_logps(logps, mask).cpu()


def best_of_n(model, reference, processor, question: str, images: list[str], n: int, beta: float = 0.1,
              seed: int = 0, **generation) -> tuple[Candidate, list[Candidate]]:  # fmt: skip
    """The best of `n` sampled answers by the implicit reward, and every candidate (in sampling order). An empty
    answer (the model stopped at once) cannot be scored and is never picked."""
    if not isinstance(processor, MPMProcessor):
        raise ValueError("best-of-N scores answers with an MPM checkpoint's processor (a LLaVA one is not read yet)")
    if n < 1:
        raise ValueError(f"best-of-N needs n >= 1, got {n}")
    loaded = [open_image(i) for i in images]
    torch.manual_seed(seed)  # the n samples are drawn in one batch: reproducible from one seed
    request = Request(loaded, messages=[{"role": "user", "content": question}])
    answers = generate(model, processor, [request] * n, batch_size=n, **{"do_sample": True, **generation})
    scorable = [a for a in answers if a.strip()]
    rewards = {}
    if scorable:
        policy = answer_logps(model, processor, question, loaded, scorable)
        ref = answer_logps(reference, processor, question, loaded, scorable)
        rewards = {i: beta * float(p - r) for i, (p, r) in enumerate(zip(policy, ref, strict=True))}
    candidates, k = [], 0
    for answer in answers:
        if answer.strip():
            candidates.append(Candidate(answer, rewards[k]))
            k += 1
        else:
            candidates.append(Candidate(answer, float("-inf")))
    return max(candidates, key=lambda c: c.reward), candidates
