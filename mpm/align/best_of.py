"""Best-of-N at inference with DPO's implicit reward (RLAIF-V, CVPR'25 version): sample N answers from the aligned
policy and keep the one it prefers most over the reference model:

    r(y) = beta * (log pi(y | x) - log ref(y | x))      summed over the answer's tokens (and what closes its turn)

A DPO-trained policy is the reference reweighted by exp(r / beta), so r ranks answers the way the preference data
would; no separate reward model is needed, only the model the policy started from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mpm.align.batches import encode_answer, prompt_request, response_logps
from mpm.align.losses import sequence_logps
from mpm.core.images import open_image
from mpm.data import to_device
from mpm.inference import generate
from mpm.processor import MPMProcessor


@dataclass
class Candidate:
    answer: str
    reward: float  # beta * (log pi - log ref) of the answer


@torch.no_grad()
def answer_logps(model, processor: MPMProcessor, question: str, images: list, answers: list[str],
                 raw_prompt: str | None = None) -> torch.Tensor:  # fmt: skip
    """(N,) summed log-probs of each answer to `question` about `images` under `model` (one batch)."""
    encoded = [encode_answer(processor, question, answer, images, raw_prompt) for answer in answers]
    batch = to_device(processor.collate(encoded), next(model.parameters()).device)
    logps, mask = response_logps(model, batch)
    return sequence_logps(logps, mask).cpu()


def best_of_n(model, reference, processor, question: str, images: list[str], n: int, beta: float = 0.1,
              seed: int = 0, raw_prompt: str | None = None, **generation) -> tuple[Candidate, list[Candidate]]:  # fmt: skip
    """The best of `n` sampled answers by the implicit reward, and every candidate (in sampling order). An empty
    answer (the model stopped at once) cannot be scored and is never picked. `raw_prompt`: for a model trained on
    raw prompts, the template (`{question}`, `<image>`) the question is asked in."""
    if not isinstance(processor, MPMProcessor):
        raise ValueError("best-of-N scores answers with an MPM checkpoint's processor: convert a LLaVA one with "
                         "mpm.export.from_llava (mpm chat --best-of does)")  # fmt: skip
    if n < 1:
        raise ValueError(f"best-of-N needs n >= 1, got {n}")
    loaded = [open_image(i) for i in images]
    torch.manual_seed(seed)  # the n samples are drawn in one batch: reproducible from one seed
    request = prompt_request(question, loaded, raw_prompt)
    answers = generate(model, processor, [request] * n, batch_size=n, **{"do_sample": True, **generation})
    scorable = [a for a in answers if a.strip()]
    rewards = {}
    if scorable:
        policy = answer_logps(model, processor, question, loaded, scorable, raw_prompt)
        ref = answer_logps(reference, processor, question, loaded, scorable, raw_prompt)
        rewards = {i: beta * float(p - r) for i, (p, r) in enumerate(zip(policy, ref, strict=True))}
    candidates, k = [], 0
    for answer in answers:
        if answer.strip():
            candidates.append(Candidate(answer, rewards[k]))
            k += 1
        else:
            candidates.append(Candidate(answer, float("-inf")))
    return max(candidates, key=lambda c: c.reward), candidates
