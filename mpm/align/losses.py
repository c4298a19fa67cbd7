"""The preference losses: DPO (Rafailov et al. 2023), RLHF-V's dense DPO (DDPO, Yu et al. CVPR'24, Eq. 5) and the
corrected-segment weights DDPO needs, recovered from a token diff of the two responses.

Written out (x the prompt and image, y_w the chosen response, y_l the rejected one, pi the policy, ref the frozen
reference model; every log-prob below is a per-sequence score, the same function for pi and ref):
    token log-prob   l_t     = log p(y_t | x, y_<t)            logits shifted by one; labels -100 are not scored
    weights          w_t     = gamma if y_t is in a corrected segment (y_c), else 1 (unchanged, y_u)
    score            s(y)    = sum_t w_t * l_t                               (normalise=False)
                     s(y)    = sum_t w_t * l_t / N,  N = |y_u| + gamma |y_c| = sum_t w_t   (normalise=True)
    margin           m       = (s_pi(y_w) - s_ref(y_w)) - (s_pi(y_l) - s_ref(y_l))
    DPO loss         L       = -log sigmoid(beta * m)
    rewards          r_w     = beta * (s_pi(y_w) - s_ref(y_w)),   r_l = beta * (s_pi(y_l) - s_ref(y_l))
    SFT term         L      += sft_weight * NLL(y_w),  NLL(y_w) = -s_pi(y_w) unless given
Plain DPO is gamma = 1, normalise=False: s(y) is the summed log-prob, what RLAIF-V trains with (beta 0.1).

Corrected segments (the released RLHF-V code, `Muffin/utils/diff_lib.py::get_diff_ids`, collated at train time;
the dataset stores only the corrected text as `chosen` and the original as `rejected`):
    1. `difflib.SequenceMatcher(None, chosen_ids, rejected_ids, autojunk=False)` on the response TOKEN IDS.
    2. Its matching blocks shorter than `min_match` (3) tokens are dropped: a 1-2 token coincidence ("a", ",")
       inside an edit is part of the edit, so it merges into the changed segment around it.
    3. The gaps between the kept blocks are the changed segments. A gap with tokens on BOTH sides is a replacement,
       a correction: its chosen tokens get gamma in the chosen weights, its rejected tokens gamma in the rejected
       weights. A gap with tokens on one side only (a pure insertion or deletion) keeps weight 1: the released code
       weights only spans where both sides are non-empty (seeds-notes 3.2), and an insertion has no counterpart to
       contrast it with.
    4. A matching block at the very start of both responses (a common prefix) is kept whatever its length: the
       released code diffs prompt + response, where such a prefix joins the prompt's match, so it is never part of
       a correction there either.
Differences from the released code, on purpose: `autojunk=False` (difflib's default treats tokens frequent in a
sequence of 200+ as junk, which silently changes the segments of long answers), and only the response is diffed.
Identical responses give no corrected tokens and a constant loss (log 2, zero gradient): `is_degenerate` lets the
caller drop such pairs instead of training on them.

Per pair, not per batch: `preference_loss` returns one loss per pair. The recipe sums them over the step's
micro-batches and divides once by the step's pair count, so a micro-batch with fewer pairs weighs no more per pair.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mpm.core.errors import ConfigError
from mpm.processor import IGNORE_INDEX  # labels with this value (prompt, image, padding) are not scored


@dataclass(frozen=True)
class LossSettings:
    """One loss: `beta` the DPO temperature, `gamma` the corrected-token weight (1 = plain DPO), `normalise` divide
    each score by N = sum of weights, `sft_weight` the weight of the chosen response's NLL, `min_match` the shortest
    matching block that counts as unchanged."""

    beta: float
    gamma: float = 1.0
    normalise: bool = False
    sft_weight: float = 0.0
    min_match: int = 3

    def __post_init__(self):
        if not self.beta > 0:
            raise ConfigError(f"loss `beta` must be > 0 but is {self.beta}")
        if not self.gamma > 0:
            raise ConfigError(f"loss `gamma` must be > 0 (1 = plain DPO, RLHF-V uses 1.1-5) but is {self.gamma}")
        if not self.sft_weight >= 0:
            raise ConfigError(f"loss `sft_weight` must be >= 0 but is {self.sft_weight}")
        if self.min_match < 1:
            raise ConfigError(f"loss `min_match` must be >= 1 token but is {self.min_match}")

    @property
    def token_weighted(self) -> bool:
        """Whether the token diff is needed at all (gamma 1 weights every token 1)."""
        return self.gamma != 1.0


PRESETS = {
    # RLAIF-V's loss (seeds-notes 4.3): summed log-probs, beta 0.1.
    "dpo": LossSettings(beta=0.1, gamma=1.0, normalise=False),
    # RLHF-V paper, Eq. 5 and section 4 (seeds-notes 3.2): gamma 5, beta 0.5, scores divided by N.
    "rlhfv_paper": LossSettings(beta=0.5, gamma=5.0, normalise=True),
    # RLHF-V as released (`run_RLHFV.sh`: dpo_token_weighted, dpo_use_average=False): gamma 1.1, beta 0.1, summed.
    # The maintainers say 1.1 "trains more stably for a wider range of environments" (RLHF-V issue #18).
    "rlhfv_released": LossSettings(beta=0.1, gamma=1.1, normalise=False),
}


def preset(name: str) -> LossSettings:
    """The named loss settings; a ConfigError listing the names for an unknown one."""
    if name not in PRESETS:
        raise ConfigError(f"unknown loss preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


# ---- corrected segments from a token diff ---------------------------------------------------------------------


def _ids(ids) -> list[int]:
    return [int(t) for t in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]


def corrected_spans(
    chosen_ids: Sequence[int] | torch.Tensor, rejected_ids: Sequence[int] | torch.Tensor, min_match: int = 3
) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """The replacement segments between the two responses, as ((chosen_start, chosen_end), (rejected_start,
    rejected_end)) half-open index ranges into each; the rule is in the module docstring."""
    a, b = _ids(chosen_ids), _ids(rejected_ids)
    blocks = difflib.SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks()
    # The last block is difflib's sentinel (len(a), len(b), 0): it closes the final gap, so it is always kept.
    kept = [m for m in blocks[:-1] if m.size >= min_match or (m.a == 0 and m.b == 0)] + [blocks[-1]]
    spans = []
    a_pos = b_pos = 0
    for m in kept:
        if m.a > a_pos and m.b > b_pos:  # tokens on both sides: a replacement (one side only: insert/delete, weight 1)
            spans.append(((a_pos, m.a), (b_pos, m.b)))
        a_pos, b_pos = m.a + m.size, m.b + m.size
    return spans


def segment_weights(
    chosen_ids: Sequence[int] | torch.Tensor,
    rejected_ids: Sequence[int] | torch.Tensor,
    gamma: float,
    min_match: int = 3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token weights of each response, (len(chosen_ids),) and (len(rejected_ids),) float32: gamma on the tokens
    of corrected segments, 1 elsewhere. The ids are the response tokens only, in order (the labels != -100)."""
    chosen_w = torch.ones(len(_ids(chosen_ids)), dtype=torch.float32)
    rejected_w = torch.ones(len(_ids(rejected_ids)), dtype=torch.float32)
    for (a0, a1), (b0, b1) in corrected_spans(chosen_ids, rejected_ids, min_match):
        chosen_w[a0:a1] = gamma
        rejected_w[b0:b1] = gamma
    return chosen_w, rejected_w


def is_degenerate(chosen_ids: Sequence[int] | torch.Tensor, rejected_ids: Sequence[int] | torch.Tensor) -> bool:
    """True when the two responses are the same tokens: the margin is 0 for every model, the loss is log 2 with no
    gradient, and the pair only dilutes the step; drop it and count it."""
    return _ids(chosen_ids) == _ids(rejected_ids)


# ---- log-probs --------------------------------------------------------------------------------------------------


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the labels under a causal LM.

    Args:
        logits: (B, T, V); position t predicts token t + 1.
        labels: (B, T), -100 where a token is not scored (prompt, image, padding).
    Returns:
        logps (B, T - 1) float32, 0 where not scored; mask (B, T - 1) bool, True where scored.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} must agree on (B, T)")
    labels = labels[:, 1:]
    return target_logps(logits[:, :-1], labels), labels != IGNORE_INDEX


def target_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, K) log p(targets) from logits (B, K, V) already aligned with them (position k predicts target k); 0
    where a target is -100. Only the scored positions, in float32 (bf16 over a 30k-150k vocabulary loses the small
    differences DPO feeds on), as log p = logit - logsumexp(logits): no float32 log-softmax of the whole batch
    (TRL's selective log-softmax does the same)."""
    mask = targets != IGNORE_INDEX
    scored = logits[mask].float()  # (N, V), N scored tokens
    picked = scored.gather(-1, targets[mask].unsqueeze(-1)).squeeze(-1) - scored.logsumexp(-1)
    logps = torch.zeros(mask.shape, dtype=torch.float32, device=logits.device)
    return logps.masked_scatter(mask, picked)


def place_weights(response_weights: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """(B, T - 1) weights for `sequence_logps`: row i gets `response_weights[i]` at its scored positions, in order,
    and 1 elsewhere (those positions are masked out anyway)."""
    if len(response_weights) != mask.shape[0]:
        raise ValueError(f"{len(response_weights)} weight rows for a batch of {mask.shape[0]}")
    out = torch.ones(mask.shape, dtype=torch.float32, device=mask.device)
    for i, w in enumerate(response_weights):
        scored = int(mask[i].sum())
        if w.numel() != scored:
            raise ValueError(f"row {i}: {w.numel()} token weights for {scored} scored tokens; diff the labelled ids")
        out[i, mask[i]] = w.to(out)
    return out


def sequence_logps(
    logps: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None = None, normalise: bool = False
) -> torch.Tensor:
    """Per-sequence score (B,): sum_t w_t * l_t over scored tokens, divided by N = sum_t w_t when `normalise`.
    `weights` None means 1 everywhere (plain DPO); use the same weights for the policy and the reference."""
    w = mask.to(logps.dtype) if weights is None else weights.to(logps.dtype) * mask
    total = (logps * w).sum(-1)
    if not normalise:
        return total
    n = w.sum(-1)
    if bool((n <= 0).any()):
        raise ValueError("a sequence has no scored tokens (all labels -100): cannot normalise its log-prob")
    return total / n


# ---- the loss ---------------------------------------------------------------------------------------------------


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    chosen_nll: torch.Tensor | None = None,
    sft_weight: float = 0.0,
) -> dict[str, torch.Tensor]:
    """The sigmoid DPO loss on per-sequence scores (B,) from `sequence_logps`, plus `sft_weight * chosen_nll`.

    `chosen_nll` None means -policy_chosen: the chosen response's score as DPO sees it (weighted; summed or divided
    by N as set), which is what the released RLHF-V / RLAIF-V code adds (`- SFT_weight * policy_win_logp`).
    Returns per-pair tensors (B,), never a mean: `losses` (what to sum and backpropagate), `dpo_losses`,
    `chosen_rewards`, `rejected_rewards` (both detached, for logging and reward accuracy).
    """
    if not beta > 0:
        raise ValueError(f"`beta` must be > 0 but is {beta}")
    if not sft_weight >= 0:
        raise ValueError(f"`sft_weight` must be >= 0 but is {sft_weight}")
    shapes = {tuple(t.shape) for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"the four scores must be (B,) tensors of one shape, got shapes {sorted(shapes)}")
    chosen_ratio = policy_chosen - ref_chosen  # log pi(y_w|x)/ref(y_w|x), as scored
    rejected_ratio = policy_rejected - ref_rejected
    dpo_losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))  # logsigmoid: stable for large margins
    losses = dpo_losses
    if sft_weight > 0:
        nll = -policy_chosen if chosen_nll is None else chosen_nll
        losses = losses + sft_weight * nll
    return {
        "losses": losses,
        "dpo_losses": dpo_losses,
        "chosen_rewards": beta * chosen_ratio.detach(),
        "rejected_rewards": beta * rejected_ratio.detach(),
    }
