"""RLAIF-V steps 4-5: score responses by their rejected claims, pick preference pairs, balance their lengths.

Every rule below is what RLAIF-V's code does (RLHF-V/RLAIF-V, utils/; seeds-notes 4.1.3-4.1.5):

1. Claim verdict (`utils/pair_construction.py`, `pred_scores_yes > pred_scores_no`): a claim is accepted when
       P(yes) + P(Yes) > P(no) + P(No)
   strictly; a tie counts as rejected. The labeler (`labeler.score_questions`) sums the forms of each word and
   returns the normalised score P(yes) / (P(yes) + P(no)); `claim_accepted(score)` is score > ACCEPT_ABOVE (0.5),
   the same rule. This is the one place the threshold is defined.
2. Response score (same file, `sum(value) - len(value)`):
       score = #accepted - #claims = -(#rejected claims)
   A response with no claims has no verdicts and never enters RLAIF-V's table, so it is never paired:
   `score_response` returns None for it and `candidate_pairs` leaves it out (an unchecked response is not
   "perfect") and returns how many it left out.
3. Candidate pairs (same file, `get_pair_data` / `pair_data_judge` with `diff=1`): every unordered pair of
   responses to the same instruction, in `itertools.combinations` order, with |score_a - score_b| >= min_gap;
   chosen = the higher score. Equal scores never pair, so an instruction whose responses all score the same
   gives nothing.
4. At most 2 pairs per instruction (`utils/get_preference_pairs.py::sample_pair_data`, `--sample_num 2`): when an
   instruction has more, `random.sample(pairs, 2)` picks 2 uniformly at random without replacement; otherwise all
   are kept. RLAIF-V's random is unseeded; here it takes a seed so a rerun gives the same pairs.
5. Length balancing (`utils/get_pairs_filter_shorten.py`), over ALL sampled pairs at once, after step 4:
   for r in 0, 0.02, ..., 0.98 (`np.arange(0, 1, 0.02)`), keep a pair when
       (len_rejected - len_chosen) / len_rejected <= r      and  chosen.strip() != rejected.strip()
   (lengths in whitespace words, `len(text.split())`), and measure
       gap(r) = |mean len_chosen - mean len_rejected| / mean len_rejected   over the kept pairs.
   The r with the smallest gap wins (the first, i.e. smallest, r on ties: pandas `idxmin`) and its kept pairs
   are the output. Why: the hallucination-free response is often the shorter one, and DPO on such pairs learns
   "shorter is better"; dropping the pairs whose chosen answer is much shorter evens the two sides out.
   Where RLAIF-V would divide by zero (no pair kept at some r, or every kept rejected answer empty), gap(r) is
   +inf here so that r is never picked; a rejected answer of length 0 cannot be longer than the chosen one, so
   the pair is never dropped as "chosen shorter".
   Whitespace words count a Chinese or Japanese answer as one or a few words; pass `length=len` (characters)
   for CJK data.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import combinations

SWEEP_STEPS = 50  # r = i / 50 for i in 0..49: np.arange(0, 1, 0.02) without float drift (0.06000000000000001)
MAX_PAIRS_PER_INSTRUCTION = 2  # get_preference_pairs.py --sample_num default
ACCEPT_ABOVE = 0.5  # a claim is accepted when its labeler score is above this: P(yes) > P(no), a tie rejected


@dataclass(frozen=True)
class ScoredResponse:
    instruction_id: str  # responses to the same image + question share it (RLAIF-V's ds_question_id@question)
    response_id: str
    text: str
    score: int | None  # -(number of rejected claims), from score_response; None: no claims, never paired


@dataclass(frozen=True)
class RankedPair:
    instruction_id: str
    chosen: ScoredResponse
    rejected: ScoredResponse


@dataclass(frozen=True)
class LengthSweep:
    """The length-balancing result: the ratio picked and the statistics of the pairs it kept."""

    ratio: float
    kept: int
    dropped: int
    mean_chosen_len: float
    mean_rejected_len: float
    gap: float  # |mean_chosen_len - mean_rejected_len| / mean_rejected_len


def claim_accepted(score: float) -> bool:
    """RLAIF-V's verdict on a labeler score P(yes) / (P(yes) + P(no)): accepted only when it is above ACCEPT_ABOVE,
    i.e. yes is strictly more likely than no (a tie is a rejection)."""
    return score > ACCEPT_ABOVE


def score_response(verdicts: Sequence[bool]) -> int | None:
    """-(number of rejected claims), or None for a response with no claims (it cannot be paired)."""
    if not verdicts:
        return None
    return sum(bool(v) for v in verdicts) - len(verdicts)


def candidate_pairs(responses: Sequence[ScoredResponse], min_gap: int = 1) -> tuple[list[RankedPair], int]:
    """Every pair of responses to the same instruction whose scores differ by at least `min_gap`, and the number of
    responses left out because they have no score (no claims: `score_response` gave None)."""
    if min_gap < 1:
        raise ValueError(f"min_gap must be >= 1 (equal scores are no preference), got {min_gap}")
    by_instruction: dict[str, list[ScoredResponse]] = defaultdict(list)
    unscored = 0
    for r in responses:
        if r.score is None:
            unscored += 1
            continue
        by_instruction[r.instruction_id].append(r)
    pairs = []
    for key, group in by_instruction.items():
        for a, b in combinations(group, 2):
            if abs(a.score - b.score) >= min_gap:
                chosen, rejected = (a, b) if a.score > b.score else (b, a)
                pairs.append(RankedPair(key, chosen, rejected))
    return pairs, unscored


def sample_pairs(
    pairs: Sequence[RankedPair], max_per_instruction: int = MAX_PAIRS_PER_INSTRUCTION, seed: int = 0
) -> list[RankedPair]:
    """At most `max_per_instruction` pairs per instruction, drawn uniformly at random where there are more."""
    if max_per_instruction < 1:
        raise ValueError(f"max_per_instruction must be >= 1, got {max_per_instruction}")
    rng = random.Random(seed)
    by_instruction: dict[str, list[RankedPair]] = defaultdict(list)
    for p in pairs:
        by_instruction[p.instruction_id].append(p)
    out = []
    for group in by_instruction.values():
        out += rng.sample(group, max_per_instruction) if len(group) >= max_per_instruction else group
    return out


def word_count(text: str) -> int:
    return len(text.split())


def shortening(chosen_len: int, rejected_len: int) -> float:
    """How much shorter the chosen answer is, as a fraction of the rejected one (negative when it is longer)."""
    if rejected_len == 0:
        return 0.0 if chosen_len == 0 else float("-inf")  # chosen cannot be shorter than an empty answer
    return (rejected_len - chosen_len) / rejected_len


def filter_by_length(pairs: Iterable[RankedPair], max_shortening: float, length: Callable[[str], int] = word_count):
    """The pairs whose chosen answer is at most `max_shortening` shorter than the rejected one, and differs from it."""
    return [
        p
        for p in pairs
        if shortening(length(p.chosen.text), length(p.rejected.text)) <= max_shortening
        and p.chosen.text.strip() != p.rejected.text.strip()
    ]


def _gap(pairs: Sequence[RankedPair], length: Callable[[str], int]) -> tuple[float, float, float]:
    if not pairs:
        return float("nan"), float("nan"), float("inf")
    mean_c = sum(length(p.chosen.text) for p in pairs) / len(pairs)
    mean_r = sum(length(p.rejected.text) for p in pairs) / len(pairs)
    gap = abs(mean_c - mean_r) / mean_r if mean_r > 0 else (0.0 if mean_c == 0 else float("inf"))
    return mean_c, mean_r, gap


def balance_lengths(
    pairs: Sequence[RankedPair], length: Callable[[str], int] = word_count
) -> tuple[list[RankedPair], LengthSweep]:
    """RLAIF-V's length sweep (module docstring, rule 5): the kept pairs and the sweep's pick."""
    best: tuple[float, float, list[RankedPair], float, float] | None = None
    for i in range(SWEEP_STEPS):
        ratio = i / SWEEP_STEPS
        kept = filter_by_length(pairs, ratio, length)
        mean_c, mean_r, gap = _gap(kept, length)
        if best is None or gap < best[0]:  # strict: the smallest ratio wins a tie, as pandas idxmin
            best = (gap, ratio, kept, mean_c, mean_r)
    gap, ratio, kept, mean_c, mean_r = best
    return kept, LengthSweep(ratio, len(kept), len(pairs) - len(kept), mean_c, mean_r, gap)
